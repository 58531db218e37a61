//! Compiled Kafka rules of one (endpoint, remote identity, port): the per-request decision.
//!
//! Semantics follow Cilium's Kafka policy: a rule names any of `role` (expanded to API keys)
//! or `apiKey`, `apiVersion`, `clientID` and `topic`, all of which must hold; rules are ORed;
//! and **every** topic a request carries must be allowed by some rule that otherwise matches.
//! A rule without a topic (or a request that carries no topic) is decided by the other fields.
//! A request whose topics could not be read (a kind or version the codec does not know) is
//! only allowed by rules that name no topic: an unknown request never slips past a topic rule.

use std::collections::BTreeSet;

use kafka_protocol::messages::ApiKey;
use policy::model::{KafkaRole, KafkaRule};

use crate::error::L7Error;

/// API keys a role stands for (Cilium's `KafkaRoleMap`).
pub fn role_api_keys(role: KafkaRole) -> &'static [i16] {
    const PRODUCE: &[i16] = &[0, 3, 18]; // Produce, Metadata, ApiVersions
    const CONSUME: &[i16] = &[
        1,  // Fetch
        2,  // ListOffsets
        3,  // Metadata
        8,  // OffsetCommit
        9,  // OffsetFetch
        10, // FindCoordinator
        11, // JoinGroup
        12, // Heartbeat
        13, // LeaveGroup
        14, // SyncGroup
        18, // ApiVersions
    ];
    match role {
        KafkaRole::Produce => PRODUCE,
        KafkaRole::Consume => CONSUME,
    }
}

/// The topics of a request as the matcher sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestTopics {
    /// The request was decoded: these are its topics (names; topic IDs that could not be
    /// resolved to a name appear as `None` and match no topic rule).
    Known(Vec<Option<String>>),
    /// The request could not be decoded, so its topics are unknown.
    Unknown,
}

/// What a request looks like to the matcher.
#[derive(Debug, Clone, Copy)]
pub struct KafkaRequestView<'a> {
    pub api_key: i16,
    pub api_version: i16,
    pub client_id: Option<&'a str>,
    pub topics: &'a RequestTopics,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KafkaDecision {
    Allowed,
    Denied,
}

#[derive(Debug, Clone)]
struct CompiledRule {
    /// Empty: any API key.
    api_keys: Vec<i16>,
    api_version: Option<i16>,
    client_id: Option<String>,
    topic: Option<String>,
}

impl CompiledRule {
    /// Everything but the topic.
    fn matches_request(&self, req: &KafkaRequestView<'_>) -> bool {
        (self.api_keys.is_empty() || self.api_keys.contains(&req.api_key))
            && self.api_version.is_none_or(|v| v == req.api_version)
            && self
                .client_id
                .as_deref()
                .is_none_or(|c| req.client_id == Some(c))
    }
}

/// The compiled Kafka rules of one port.
#[derive(Debug, Clone)]
pub struct KafkaPolicy {
    /// `None`: every request is allowed.
    rules: Option<Vec<CompiledRule>>,
    needs_topics: bool,
}

impl KafkaPolicy {
    pub fn allow_all() -> KafkaPolicy {
        KafkaPolicy {
            rules: None,
            needs_topics: false,
        }
    }

    /// Compiles the rules of one port; an empty list allows everything.
    pub fn compile(rules: &[KafkaRule]) -> Result<KafkaPolicy, L7Error> {
        if rules.is_empty() {
            return Ok(KafkaPolicy::allow_all());
        }
        let mut out = Vec::with_capacity(rules.len());
        for (i, r) in rules.iter().enumerate() {
            // The parser expands `role` into `api_keys`; expand here too so a rule built
            // elsewhere means the same.
            let mut keys: BTreeSet<i16> = r.api_keys.iter().copied().collect();
            if let Some(role) = r.role {
                keys.extend(role_api_keys(role));
            }
            for k in &keys {
                if ApiKey::try_from(*k).is_err() {
                    return Err(L7Error::KafkaApiKey { rule: i, key: *k });
                }
            }
            out.push(CompiledRule {
                api_keys: keys.into_iter().collect(),
                api_version: r.api_version,
                client_id: r.client_id.clone().filter(|c| !c.is_empty()),
                topic: r.topic.clone().filter(|t| !t.is_empty()),
            });
        }
        let needs_topics = out.iter().any(|r| r.topic.is_some());
        Ok(KafkaPolicy {
            rules: Some(out),
            needs_topics,
        })
    }

    pub fn allows_all(&self) -> bool {
        self.rules.is_none()
    }

    /// Whether a decision may depend on the request's topics (if not, the proxy need not
    /// decode request bodies).
    pub fn needs_topics(&self) -> bool {
        self.needs_topics
    }

    pub fn check(&self, req: &KafkaRequestView<'_>) -> KafkaDecision {
        let Some(rules) = &self.rules else {
            return KafkaDecision::Allowed;
        };
        let topics: Option<Vec<&Option<String>>> = match req.topics {
            RequestTopics::Known(t) if !t.is_empty() => Some(t.iter().collect()),
            RequestTopics::Known(_) => None,
            RequestTopics::Unknown => {
                // Only a rule that does not care about topics can allow it.
                return if rules
                    .iter()
                    .any(|r| r.topic.is_none() && r.matches_request(req))
                {
                    KafkaDecision::Allowed
                } else {
                    KafkaDecision::Denied
                };
            }
        };
        let Some(topics) = topics else {
            // No topic in the request: the other fields decide.
            return if rules.iter().any(|r| r.matches_request(req)) {
                KafkaDecision::Allowed
            } else {
                KafkaDecision::Denied
            };
        };
        let mut uncovered: Vec<bool> = vec![true; topics.len()];
        for r in rules {
            if !r.matches_request(req) {
                continue;
            }
            match &r.topic {
                None => return KafkaDecision::Allowed,
                Some(t) => {
                    for (i, rt) in topics.iter().enumerate() {
                        if rt.as_deref() == Some(t.as_str()) {
                            uncovered[i] = false;
                        }
                    }
                }
            }
        }
        if uncovered.iter().any(|u| *u) {
            KafkaDecision::Denied
        } else {
            KafkaDecision::Allowed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(
        key: i16,
        ver: i16,
        client: Option<&'a str>,
        topics: &'a RequestTopics,
    ) -> KafkaRequestView<'a> {
        KafkaRequestView {
            api_key: key,
            api_version: ver,
            client_id: client,
            topics,
        }
    }

    fn known(t: &[&str]) -> RequestTopics {
        RequestTopics::Known(t.iter().map(|s| Some(s.to_string())).collect())
    }

    #[test]
    fn role_and_topic() {
        let p = KafkaPolicy::compile(&[KafkaRule {
            role: Some(KafkaRole::Consume),
            topic: Some("orders".into()),
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(
            p.check(&view(1, 11, None, &known(&["orders"]))),
            KafkaDecision::Allowed
        );
        assert_eq!(
            p.check(&view(0, 9, None, &known(&["orders"]))),
            KafkaDecision::Denied
        );
        assert_eq!(
            p.check(&view(1, 11, None, &known(&["orders", "x"]))),
            KafkaDecision::Denied
        );
        // Metadata for all topics carries none: decided by the other fields.
        assert_eq!(
            p.check(&view(3, 9, None, &known(&[]))),
            KafkaDecision::Allowed
        );
        assert_eq!(
            p.check(&view(1, 11, None, &RequestTopics::Unknown)),
            KafkaDecision::Denied
        );
        let unresolved = RequestTopics::Known(vec![None]);
        assert_eq!(
            p.check(&view(1, 13, None, &unresolved)),
            KafkaDecision::Denied
        );
    }

    #[test]
    fn every_topic_must_be_covered_by_some_rule() {
        let p = KafkaPolicy::compile(&[
            KafkaRule {
                api_keys: vec![0],
                topic: Some("a".into()),
                ..Default::default()
            },
            KafkaRule {
                api_keys: vec![0],
                topic: Some("b".into()),
                client_id: Some("c1".into()),
                ..Default::default()
            },
        ])
        .unwrap();
        assert_eq!(
            p.check(&view(0, 9, Some("c1"), &known(&["a", "b"]))),
            KafkaDecision::Allowed
        );
        assert_eq!(
            p.check(&view(0, 9, Some("c2"), &known(&["a", "b"]))),
            KafkaDecision::Denied
        );
        assert_eq!(
            p.check(&view(0, 9, None, &known(&["a"]))),
            KafkaDecision::Allowed
        );
    }

    #[test]
    fn version_client_and_wildcards() {
        let p = KafkaPolicy::compile(&[KafkaRule {
            api_keys: vec![18],
            api_version: Some(3),
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(
            p.check(&view(18, 3, None, &known(&[]))),
            KafkaDecision::Allowed
        );
        assert_eq!(
            p.check(&view(18, 2, None, &known(&[]))),
            KafkaDecision::Denied
        );
        assert_eq!(
            p.check(&view(18, 3, None, &RequestTopics::Unknown)),
            KafkaDecision::Allowed
        );
        assert!(KafkaPolicy::compile(&[]).unwrap().allows_all());
        assert!(KafkaPolicy::compile(&[KafkaRule {
            api_keys: vec![9999],
            ..Default::default()
        }])
        .is_err());
    }
}
