//! Kafka request framing and the responses fqdnwall makes for denied requests (sans-I/O).
//!
//! A frame is a 4-byte big-endian size followed by that many bytes. Every request header
//! version (1 and 2) starts with api key, api version, correlation id and client id, so the
//! head of any request, even of a kind this codec does not know, is read the same way.
//! Bodies are decoded with the `kafka-protocol` crate only when the policy needs the topics.
//! Responses start with the correlation id; flexible versions (header v1) add tagged fields,
//! and the crate tells which header version each (api key, version) uses.

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    self as m, ApiKey, RequestHeader, RequestKind, ResponseHeader, ResponseKind,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

use crate::kafka_rules::RequestTopics;

/// TOPIC_AUTHORIZATION_FAILED: the error code of every denial.
pub const TOPIC_AUTHORIZATION_FAILED: i16 = 29;

/// Kafka's default `socket.request.max.bytes` (100 MiB): larger frames are refused.
pub const DEFAULT_MAX_FRAME: usize = 100 * 1024 * 1024;

/// Smallest request head: api key, api version, correlation id, client id length.
const MIN_HEAD: usize = 2 + 2 + 4 + 2;

/// `config.resource_type` of a topic in the configs APIs.
const RESOURCE_TOPIC: i8 = 2;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KafkaParseError {
    #[error("request frame of {0} bytes is shorter than a request header")]
    Short(usize),
    #[error("frame of {size} bytes is larger than the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("negative frame size {0}")]
    NegativeSize(i32),
    #[error("request header: {0}")]
    Header(String),
}

/// The head of a request: enough to route it, match role/apiKey/apiVersion/clientID, and
/// answer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub api_key: i16,
    pub api_version: i16,
    pub correlation_id: i32,
    pub client_id: Option<String>,
}

impl RequestHead {
    pub fn api(&self) -> Option<ApiKey> {
        ApiKey::try_from(self.api_key).ok()
    }

    /// `Produce`, `Fetch`, ... or `unknown`.
    pub fn api_name(&self) -> &'static str {
        self.api().map(api_key_name).unwrap_or("unknown")
    }

    /// Whether the codec knows this (api key, version).
    pub fn is_known_version(&self) -> bool {
        self.api().is_some_and(|k| {
            let r = k.valid_versions();
            (r.min..=r.max).contains(&self.api_version)
        })
    }
}

/// How long the next frame in `buf` is, if its size prefix is complete:
/// `Ok(Some(total length including the prefix))`.
pub fn frame_len(buf: &[u8], max: usize) -> Result<Option<usize>, KafkaParseError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let size = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if size < 0 {
        return Err(KafkaParseError::NegativeSize(size));
    }
    let size = size as usize;
    if size > max {
        return Err(KafkaParseError::TooLarge { size, max });
    }
    Ok(Some(4 + size))
}

/// Reads the head of a request frame (the bytes after the size prefix).
pub fn parse_head(frame: &[u8]) -> Result<RequestHead, KafkaParseError> {
    if frame.len() < MIN_HEAD {
        return Err(KafkaParseError::Short(frame.len()));
    }
    let mut b = frame;
    // Header v1 is the common prefix of v1 and v2 (v2 only adds tagged fields after it).
    let h = RequestHeader::decode(&mut b, 1).map_err(|e| KafkaParseError::Header(e.to_string()))?;
    Ok(RequestHead {
        api_key: h.request_api_key,
        api_version: h.request_api_version,
        correlation_id: h.correlation_id,
        client_id: h.client_id.map(|c| c.to_string()),
    })
}

/// Decodes the body of a request whose head is `head`. `None` when the (key, version) is not
/// one the codec knows or the body does not decode.
pub fn decode_body(head: &RequestHead, frame: &Bytes) -> Option<RequestKind> {
    if !head.is_known_version() {
        return None;
    }
    let key = head.api()?;
    let mut buf = frame.clone();
    RequestHeader::decode(&mut buf, key.request_header_version(head.api_version)).ok()?;
    RequestKind::decode(key, &mut buf, head.api_version).ok()
}

/// Whether the broker answers this request (a Produce with `acks = 0` gets no response).
pub fn expects_response(body: Option<&RequestKind>) -> bool {
    !matches!(body, Some(RequestKind::Produce(p)) if p.acks == 0)
}

fn topic_name(
    name: &StrBytes,
    id: &[u8; 16],
    resolve: &dyn Fn(&[u8; 16]) -> Option<String>,
) -> Option<String> {
    if !name.is_empty() {
        return Some(name.to_string());
    }
    if id.iter().any(|b| *b != 0) {
        return resolve(id);
    }
    // An empty name and no id: still a topic, one no rule names.
    Some(String::new())
}

/// The topics a request carries. Topic IDs (newer Fetch, Produce, Metadata, DeleteTopics,
/// OffsetCommit versions) are resolved with `resolve` (IDs learned from Metadata responses);
/// unresolved ones are `None`. Kinds not listed here may name topics in ways this function
/// does not read: they are [`RequestTopics::Unknown`], so no topic rule allows them.
pub fn request_topics(
    body: &RequestKind,
    resolve: &dyn Fn(&[u8; 16]) -> Option<String>,
) -> RequestTopics {
    let n = |s: &StrBytes| Some(s.to_string());
    let t: Vec<Option<String>> = match body {
        RequestKind::Produce(r) => r
            .topic_data
            .iter()
            .map(|t| topic_name(&t.name, t.topic_id.as_bytes(), resolve))
            .collect(),
        RequestKind::Fetch(r) => r
            .topics
            .iter()
            .map(|t| topic_name(&t.topic, t.topic_id.as_bytes(), resolve))
            .collect(),
        RequestKind::ListOffsets(r) => r.topics.iter().map(|t| n(&t.name)).collect(),
        RequestKind::Metadata(r) => r
            .topics
            .iter()
            .flatten()
            .map(|t| match &t.name {
                Some(name) => topic_name(name, t.topic_id.as_bytes(), resolve),
                None => topic_name(&StrBytes::default(), t.topic_id.as_bytes(), resolve),
            })
            .collect(),
        RequestKind::OffsetCommit(r) => r
            .topics
            .iter()
            .map(|t| topic_name(&t.name, t.topic_id.as_bytes(), resolve))
            .collect(),
        RequestKind::OffsetFetch(r) => r
            .topics
            .iter()
            .flatten()
            .map(|t| n(&t.name))
            .chain(
                r.groups
                    .iter()
                    .flat_map(|g| g.topics.iter().flatten())
                    .map(|t| topic_name(&t.name, t.topic_id.as_bytes(), resolve)),
            )
            .collect(),
        RequestKind::CreateTopics(r) => r.topics.iter().map(|t| n(&t.name)).collect(),
        RequestKind::DeleteTopics(r) => r
            .topic_names
            .iter()
            .map(|t| n(t))
            .chain(r.topics.iter().map(|t| match &t.name {
                Some(name) => topic_name(name, t.topic_id.as_bytes(), resolve),
                None => topic_name(&StrBytes::default(), t.topic_id.as_bytes(), resolve),
            }))
            .collect(),
        RequestKind::DeleteRecords(r) => r.topics.iter().map(|t| n(&t.name)).collect(),
        RequestKind::CreatePartitions(r) => r.topics.iter().map(|t| n(&t.name)).collect(),
        RequestKind::OffsetForLeaderEpoch(r) => r.topics.iter().map(|t| n(&t.topic)).collect(),
        RequestKind::TxnOffsetCommit(r) => r.topics.iter().map(|t| n(&t.name)).collect(),
        RequestKind::AddPartitionsToTxn(r) => r
            .v3_and_below_topics
            .iter()
            .map(|t| n(&t.name))
            .chain(
                r.transactions
                    .iter()
                    .flat_map(|x| x.topics.iter())
                    .map(|t| n(&t.name)),
            )
            .collect(),
        RequestKind::DescribeConfigs(r) => r
            .resources
            .iter()
            .filter(|x| x.resource_type == RESOURCE_TOPIC)
            .map(|x| n(&x.resource_name))
            .collect(),
        RequestKind::AlterConfigs(r) => r
            .resources
            .iter()
            .filter(|x| x.resource_type == RESOURCE_TOPIC)
            .map(|x| n(&x.resource_name))
            .collect(),
        RequestKind::IncrementalAlterConfigs(r) => r
            .resources
            .iter()
            .filter(|x| x.resource_type == RESOURCE_TOPIC)
            .map(|x| n(&x.resource_name))
            .collect(),
        RequestKind::DescribeProducers(r) => r.topics.iter().map(|t| n(&t.name)).collect(),
        RequestKind::DescribeTopicPartitions(r) => r.topics.iter().map(|t| n(&t.name)).collect(),
        RequestKind::OffsetDelete(r) => r.topics.iter().map(|t| n(&t.name)).collect(),
        RequestKind::AlterPartitionReassignments(r) => {
            r.topics.iter().map(|t| n(&t.name)).collect()
        }
        RequestKind::ListPartitionReassignments(r) => {
            r.topics.iter().flatten().map(|t| n(&t.name)).collect()
        }
        RequestKind::ElectLeaders(r) => r
            .topic_partitions
            .iter()
            .flatten()
            .map(|t| n(&t.topic))
            .collect(),
        // Kinds that carry no topic.
        RequestKind::ApiVersions(_)
        | RequestKind::FindCoordinator(_)
        | RequestKind::JoinGroup(_)
        | RequestKind::Heartbeat(_)
        | RequestKind::LeaveGroup(_)
        | RequestKind::SyncGroup(_)
        | RequestKind::DescribeGroups(_)
        | RequestKind::ListGroups(_)
        | RequestKind::DeleteGroups(_)
        | RequestKind::SaslHandshake(_)
        | RequestKind::SaslAuthenticate(_)
        | RequestKind::InitProducerId(_)
        | RequestKind::AddOffsetsToTxn(_)
        | RequestKind::EndTxn(_)
        | RequestKind::DescribeCluster(_)
        | RequestKind::DescribeAcls(_)
        | RequestKind::ListTransactions(_)
        | RequestKind::DescribeTransactions(_)
        | RequestKind::GetTelemetrySubscriptions(_)
        | RequestKind::PushTelemetry(_) => Vec::new(),
        _ => return RequestTopics::Unknown,
    };
    RequestTopics::Known(t)
}

/// The response to a denied request: same API key and version, the request's correlation
/// id, and `error` on every topic/partition (or the top-level error code), framed with its
/// size. `None` when no well-formed response can be made for this kind (the proxy then
/// closes the connection) — or when the request expects none (see [`expects_response`]).
pub fn denied_response(
    head: &RequestHead,
    body: Option<&RequestKind>,
    error: i16,
) -> Option<Bytes> {
    let key = head.api()?;
    let version = head.api_version;
    if !head.is_known_version() {
        return None;
    }
    let resp = build_denial(body?, version, error)?;
    let mut buf = BytesMut::with_capacity(64);
    buf.put_i32(0);
    let mut h = ResponseHeader::default();
    h.correlation_id = head.correlation_id;
    h.encode(&mut buf, key.response_header_version(version))
        .ok()?;
    resp.encode(&mut buf, version).ok()?;
    let size = (buf.len() - 4) as i32;
    buf[..4].copy_from_slice(&size.to_be_bytes());
    Some(buf.freeze())
}

fn build_denial(body: &RequestKind, version: i16, err: i16) -> Option<ResponseKind> {
    Some(match body {
        RequestKind::Produce(r) => {
            let mut resp = m::ProduceResponse::default();
            for t in &r.topic_data {
                let mut tr = m::produce_response::TopicProduceResponse::default();
                tr.name = t.name.clone();
                tr.topic_id = t.topic_id;
                for p in &t.partition_data {
                    let mut pr = m::produce_response::PartitionProduceResponse::default();
                    pr.index = p.index;
                    pr.error_code = err;
                    pr.base_offset = -1;
                    tr.partition_responses.push(pr);
                }
                resp.responses.push(tr);
            }
            ResponseKind::Produce(resp)
        }
        RequestKind::Fetch(r) => {
            let mut resp = m::FetchResponse::default();
            resp.session_id = 0;
            for t in &r.topics {
                let mut tr = m::fetch_response::FetchableTopicResponse::default();
                tr.topic = t.topic.clone();
                tr.topic_id = t.topic_id;
                for p in &t.partitions {
                    let mut pr = m::fetch_response::PartitionData::default();
                    pr.partition_index = p.partition;
                    pr.error_code = err;
                    pr.high_watermark = -1;
                    pr.last_stable_offset = -1;
                    pr.log_start_offset = -1;
                    tr.partitions.push(pr);
                }
                resp.responses.push(tr);
            }
            ResponseKind::Fetch(resp)
        }
        RequestKind::ListOffsets(r) => {
            let mut resp = m::ListOffsetsResponse::default();
            for t in &r.topics {
                let mut tr = m::list_offsets_response::ListOffsetsTopicResponse::default();
                tr.name = t.name.clone();
                for p in &t.partitions {
                    let mut pr = m::list_offsets_response::ListOffsetsPartitionResponse::default();
                    pr.partition_index = p.partition_index;
                    pr.error_code = err;
                    tr.partitions.push(pr);
                }
                resp.topics.push(tr);
            }
            ResponseKind::ListOffsets(resp)
        }
        RequestKind::Metadata(r) => {
            let mut resp = m::MetadataResponse::default();
            if version >= 13 {
                resp.error_code = err;
            }
            for t in r.topics.iter().flatten() {
                let mut tr = m::metadata_response::MetadataResponseTopic::default();
                tr.error_code = err;
                tr.name = t
                    .name
                    .clone()
                    .or_else(|| (version < 12).then(Default::default));
                tr.topic_id = t.topic_id;
                resp.topics.push(tr);
            }
            ResponseKind::Metadata(resp)
        }
        RequestKind::OffsetCommit(r) => {
            let mut resp = m::OffsetCommitResponse::default();
            for t in &r.topics {
                let mut tr = m::offset_commit_response::OffsetCommitResponseTopic::default();
                tr.name = t.name.clone();
                tr.topic_id = t.topic_id;
                for p in &t.partitions {
                    let mut pr =
                        m::offset_commit_response::OffsetCommitResponsePartition::default();
                    pr.partition_index = p.partition_index;
                    pr.error_code = err;
                    tr.partitions.push(pr);
                }
                resp.topics.push(tr);
            }
            ResponseKind::OffsetCommit(resp)
        }
        RequestKind::OffsetFetch(r) => {
            let mut resp = m::OffsetFetchResponse::default();
            if version >= 8 {
                for g in &r.groups {
                    let mut gr = m::offset_fetch_response::OffsetFetchResponseGroup::default();
                    gr.group_id = g.group_id.clone();
                    gr.error_code = err;
                    resp.groups.push(gr);
                }
            } else {
                if version >= 2 {
                    resp.error_code = err;
                }
                for t in r.topics.iter().flatten() {
                    let mut tr = m::offset_fetch_response::OffsetFetchResponseTopic::default();
                    tr.name = t.name.clone();
                    for p in &t.partition_indexes {
                        let mut pr =
                            m::offset_fetch_response::OffsetFetchResponsePartition::default();
                        pr.partition_index = *p;
                        pr.committed_offset = -1;
                        pr.error_code = err;
                        tr.partitions.push(pr);
                    }
                    resp.topics.push(tr);
                }
            }
            ResponseKind::OffsetFetch(resp)
        }
        RequestKind::FindCoordinator(r) => {
            let mut resp = m::FindCoordinatorResponse::default();
            if version >= 4 {
                for k in &r.coordinator_keys {
                    let mut c = m::find_coordinator_response::Coordinator::default();
                    c.key = k.clone();
                    c.node_id = (-1).into();
                    c.port = -1;
                    c.error_code = err;
                    resp.coordinators.push(c);
                }
            } else {
                resp.error_code = err;
                resp.node_id = (-1).into();
                resp.port = -1;
            }
            ResponseKind::FindCoordinator(resp)
        }
        RequestKind::JoinGroup(_) => {
            let mut resp = m::JoinGroupResponse::default();
            resp.error_code = err;
            ResponseKind::JoinGroup(resp)
        }
        RequestKind::Heartbeat(_) => {
            let mut resp = m::HeartbeatResponse::default();
            resp.error_code = err;
            ResponseKind::Heartbeat(resp)
        }
        RequestKind::LeaveGroup(_) => {
            let mut resp = m::LeaveGroupResponse::default();
            resp.error_code = err;
            ResponseKind::LeaveGroup(resp)
        }
        RequestKind::SyncGroup(_) => {
            let mut resp = m::SyncGroupResponse::default();
            resp.error_code = err;
            ResponseKind::SyncGroup(resp)
        }
        RequestKind::ApiVersions(_) => {
            let mut resp = m::ApiVersionsResponse::default();
            resp.error_code = err;
            ResponseKind::ApiVersions(resp)
        }
        RequestKind::InitProducerId(_) => {
            let mut resp = m::InitProducerIdResponse::default();
            resp.error_code = err;
            resp.producer_id = (-1).into();
            resp.producer_epoch = -1;
            ResponseKind::InitProducerId(resp)
        }
        RequestKind::ListGroups(_) => {
            let mut resp = m::ListGroupsResponse::default();
            resp.error_code = err;
            ResponseKind::ListGroups(resp)
        }
        RequestKind::DescribeGroups(r) => {
            let mut resp = m::DescribeGroupsResponse::default();
            for g in &r.groups {
                let mut gr = m::describe_groups_response::DescribedGroup::default();
                gr.group_id = g.clone();
                gr.error_code = err;
                resp.groups.push(gr);
            }
            ResponseKind::DescribeGroups(resp)
        }
        RequestKind::DeleteGroups(r) => {
            let mut resp = m::DeleteGroupsResponse::default();
            for g in &r.groups_names {
                let mut gr = m::delete_groups_response::DeletableGroupResult::default();
                gr.group_id = g.clone();
                gr.error_code = err;
                resp.results.push(gr);
            }
            ResponseKind::DeleteGroups(resp)
        }
        RequestKind::CreateTopics(r) => {
            let mut resp = m::CreateTopicsResponse::default();
            for t in &r.topics {
                let mut tr = m::create_topics_response::CreatableTopicResult::default();
                tr.name = t.name.clone();
                tr.error_code = err;
                tr.num_partitions = -1;
                tr.replication_factor = -1;
                resp.topics.push(tr);
            }
            ResponseKind::CreateTopics(resp)
        }
        RequestKind::DeleteTopics(r) => {
            let mut resp = m::DeleteTopicsResponse::default();
            for t in &r.topic_names {
                let mut tr = m::delete_topics_response::DeletableTopicResult::default();
                tr.name = Some(t.clone());
                tr.error_code = err;
                resp.responses.push(tr);
            }
            for t in &r.topics {
                let mut tr = m::delete_topics_response::DeletableTopicResult::default();
                tr.name = t.name.clone();
                tr.topic_id = t.topic_id;
                tr.error_code = err;
                resp.responses.push(tr);
            }
            ResponseKind::DeleteTopics(resp)
        }
        RequestKind::DeleteRecords(r) => {
            let mut resp = m::DeleteRecordsResponse::default();
            for t in &r.topics {
                let mut tr = m::delete_records_response::DeleteRecordsTopicResult::default();
                tr.name = t.name.clone();
                for p in &t.partitions {
                    let mut pr =
                        m::delete_records_response::DeleteRecordsPartitionResult::default();
                    pr.partition_index = p.partition_index;
                    pr.low_watermark = -1;
                    pr.error_code = err;
                    tr.partitions.push(pr);
                }
                resp.topics.push(tr);
            }
            ResponseKind::DeleteRecords(resp)
        }
        RequestKind::CreatePartitions(r) => {
            let mut resp = m::CreatePartitionsResponse::default();
            for t in &r.topics {
                let mut tr = m::create_partitions_response::CreatePartitionsTopicResult::default();
                tr.name = t.name.clone();
                tr.error_code = err;
                resp.results.push(tr);
            }
            ResponseKind::CreatePartitions(resp)
        }
        RequestKind::OffsetForLeaderEpoch(r) => {
            let mut resp = m::OffsetForLeaderEpochResponse::default();
            for t in &r.topics {
                let mut tr =
                    m::offset_for_leader_epoch_response::OffsetForLeaderTopicResult::default();
                tr.topic = t.topic.clone();
                for p in &t.partitions {
                    let mut pr = m::offset_for_leader_epoch_response::EpochEndOffset::default();
                    pr.partition = p.partition;
                    pr.error_code = err;
                    tr.partitions.push(pr);
                }
                resp.topics.push(tr);
            }
            ResponseKind::OffsetForLeaderEpoch(resp)
        }
        RequestKind::TxnOffsetCommit(r) => {
            let mut resp = m::TxnOffsetCommitResponse::default();
            for t in &r.topics {
                let mut tr = m::txn_offset_commit_response::TxnOffsetCommitResponseTopic::default();
                tr.name = t.name.clone();
                for p in &t.partitions {
                    let mut pr =
                        m::txn_offset_commit_response::TxnOffsetCommitResponsePartition::default();
                    pr.partition_index = p.partition_index;
                    pr.error_code = err;
                    tr.partitions.push(pr);
                }
                resp.topics.push(tr);
            }
            ResponseKind::TxnOffsetCommit(resp)
        }
        _ => return None,
    })
}

/// The correlation id of a response frame (the bytes after the size prefix).
pub fn response_correlation_id(frame: &[u8]) -> Option<i32> {
    frame
        .get(..4)
        .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Topic IDs and names from a Metadata response frame, so that requests naming topics by ID
/// can be matched against topic rules.
pub fn metadata_topic_ids(version: i16, frame: &Bytes) -> Vec<([u8; 16], String)> {
    let mut buf = frame.clone();
    if ResponseHeader::decode(&mut buf, ApiKey::Metadata.response_header_version(version)).is_err()
    {
        return Vec::new();
    }
    let Ok(resp) = m::MetadataResponse::decode(&mut buf, version) else {
        return Vec::new();
    };
    resp.topics
        .into_iter()
        .filter_map(|t| {
            let id = *t.topic_id.as_bytes();
            let name = t.name?;
            (id != [0; 16] && !name.is_empty()).then(|| (id, name.to_string()))
        })
        .collect()
}

/// Kafka's name of an API key.
pub fn api_key_name(k: ApiKey) -> &'static str {
    match k {
        ApiKey::Produce => "Produce",
        ApiKey::Fetch => "Fetch",
        ApiKey::ListOffsets => "ListOffsets",
        ApiKey::Metadata => "Metadata",
        ApiKey::OffsetCommit => "OffsetCommit",
        ApiKey::OffsetFetch => "OffsetFetch",
        ApiKey::FindCoordinator => "FindCoordinator",
        ApiKey::JoinGroup => "JoinGroup",
        ApiKey::Heartbeat => "Heartbeat",
        ApiKey::LeaveGroup => "LeaveGroup",
        ApiKey::SyncGroup => "SyncGroup",
        ApiKey::DescribeGroups => "DescribeGroups",
        ApiKey::ListGroups => "ListGroups",
        ApiKey::SaslHandshake => "SaslHandshake",
        ApiKey::ApiVersions => "ApiVersions",
        ApiKey::CreateTopics => "CreateTopics",
        ApiKey::DeleteTopics => "DeleteTopics",
        ApiKey::DeleteRecords => "DeleteRecords",
        ApiKey::InitProducerId => "InitProducerId",
        ApiKey::OffsetForLeaderEpoch => "OffsetForLeaderEpoch",
        ApiKey::AddPartitionsToTxn => "AddPartitionsToTxn",
        ApiKey::AddOffsetsToTxn => "AddOffsetsToTxn",
        ApiKey::EndTxn => "EndTxn",
        ApiKey::TxnOffsetCommit => "TxnOffsetCommit",
        ApiKey::DescribeConfigs => "DescribeConfigs",
        ApiKey::AlterConfigs => "AlterConfigs",
        ApiKey::SaslAuthenticate => "SaslAuthenticate",
        ApiKey::CreatePartitions => "CreatePartitions",
        ApiKey::DeleteGroups => "DeleteGroups",
        ApiKey::IncrementalAlterConfigs => "IncrementalAlterConfigs",
        ApiKey::OffsetDelete => "OffsetDelete",
        ApiKey::DescribeCluster => "DescribeCluster",
        ApiKey::DescribeProducers => "DescribeProducers",
        ApiKey::DescribeTopicPartitions => "DescribeTopicPartitions",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
    use kafka_protocol::messages::{ProduceRequest, TopicName};
    use proptest::prelude::*;

    fn encode_request(key: ApiKey, version: i16, corr: i32, body: &RequestKind) -> Bytes {
        let mut buf = BytesMut::new();
        let mut h = RequestHeader::default();
        h.request_api_key = key as i16;
        h.request_api_version = version;
        h.correlation_id = corr;
        h.client_id = Some(StrBytes::from_static_str("client-1"));
        h.encode(&mut buf, key.request_header_version(version))
            .unwrap();
        body.encode(&mut buf, version).unwrap();
        buf.freeze()
    }

    fn produce(topics: &[&str], acks: i16) -> RequestKind {
        let mut p = ProduceRequest::default();
        p.acks = acks;
        for t in topics {
            let mut td = TopicProduceData::default();
            td.name = TopicName(StrBytes::from_string(t.to_string()));
            let mut pd = PartitionProduceData::default();
            pd.index = 0;
            td.partition_data.push(pd);
            p.topic_data.push(td);
        }
        RequestKind::Produce(p)
    }

    #[test]
    fn produce_head_topics_and_denial_in_flexible_and_legacy_versions() {
        for version in [3i16, 7, 9, 11] {
            let frame = encode_request(ApiKey::Produce, version, 77, &produce(&["a", "b"], 1));
            let head = parse_head(&frame).unwrap();
            assert_eq!(head.api_key, 0);
            assert_eq!(head.api_version, version);
            assert_eq!(head.correlation_id, 77);
            assert_eq!(head.client_id.as_deref(), Some("client-1"));
            let body = decode_body(&head, &frame).unwrap();
            assert_eq!(
                request_topics(&body, &|_| None),
                RequestTopics::Known(vec![Some("a".into()), Some("b".into())])
            );
            let resp = denied_response(&head, Some(&body), TOPIC_AUTHORIZATION_FAILED).unwrap();
            assert_eq!(
                frame_len(&resp, DEFAULT_MAX_FRAME).unwrap(),
                Some(resp.len())
            );
            let mut b = resp.slice(4..);
            assert_eq!(response_correlation_id(&b), Some(77));
            let h =
                ResponseHeader::decode(&mut b, ApiKey::Produce.response_header_version(version))
                    .unwrap();
            assert_eq!(h.correlation_id, 77);
            let r = m::ProduceResponse::decode(&mut b, version).unwrap();
            assert_eq!(b.len(), 0, "whole frame consumed");
            assert_eq!(r.responses.len(), 2);
            assert!(r
                .responses
                .iter()
                .all(|t| t.partition_responses[0].error_code == 29));
        }
    }

    #[test]
    fn acks_zero_expects_no_response() {
        let frame = encode_request(ApiKey::Produce, 7, 1, &produce(&["a"], 0));
        let head = parse_head(&frame).unwrap();
        let body = decode_body(&head, &frame).unwrap();
        assert!(!expects_response(Some(&body)));
    }

    #[test]
    fn head_of_unknown_kind_and_bad_frames() {
        let mut f = vec![0x7f, 0x00, 0, 1, 0, 0, 0, 5, 0xff, 0xff];
        let head = parse_head(&f).unwrap();
        assert_eq!(head.api_name(), "unknown");
        assert_eq!(head.client_id, None);
        assert!(decode_body(&head, &Bytes::from(f.clone())).is_none());
        f.truncate(5);
        assert!(parse_head(&f).is_err());
        assert!(frame_len(&[0xff, 0, 0, 0], DEFAULT_MAX_FRAME).is_err());
        assert!(frame_len(&[0x7f, 0, 0, 0], DEFAULT_MAX_FRAME).is_err());
        assert_eq!(frame_len(&[0, 0, 0], DEFAULT_MAX_FRAME).unwrap(), None);
    }

    #[test]
    fn hostile_array_length_does_not_allocate_it() {
        // Produce v3: transactional_id null, acks, timeout, then topic_data array of 2^31-1.
        let mut f = vec![0, 0, 0, 3, 0, 0, 0, 1, 0xff, 0xff];
        f.extend_from_slice(&[0xff, 0xff, 0, 1, 0, 0, 0, 10, 0x7f, 0xff, 0xff, 0xff]);
        let frame = Bytes::from(f);
        let head = parse_head(&frame).unwrap();
        assert!(decode_body(&head, &frame).is_none());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn random_frames_never_panic(key in 0i16..80, version in 0i16..16, tail in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut f = Vec::new();
            f.extend_from_slice(&key.to_be_bytes());
            f.extend_from_slice(&version.to_be_bytes());
            f.extend_from_slice(&tail);
            let frame = Bytes::from(f);
            if let Ok(head) = parse_head(&frame) {
                let body = decode_body(&head, &frame);
                if let Some(b) = &body {
                    let _ = request_topics(b, &|_| None);
                }
                let _ = denied_response(&head, body.as_ref(), TOPIC_AUTHORIZATION_FAILED);
            }
            let _ = metadata_topic_ids(version, &frame);
        }
    }
}
