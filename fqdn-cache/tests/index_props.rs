//! The pattern index gives exactly the answers of `FqdnSelector::matches`.

use fqdn_cache::PatternIndex;
use policy::fqdn::{DnsName, FqdnPattern};
use policy::model::FqdnSelector;
use proptest::prelude::*;

/// Pattern labels: literals, stars alone, stars inside labels.
fn pattern_label() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_string()),
        Just("b".to_string()),
        Just("ab".to_string()),
        Just("a-b".to_string()),
        Just("x_1".to_string()),
        Just("*".to_string()),
        Just("**".to_string()),
        Just("***".to_string()),
        Just("a*".to_string()),
        Just("*b".to_string()),
        Just("a*b".to_string()),
        Just("*-*".to_string()),
    ]
}

/// Name labels: what patterns can match, and what they must not (empty, odd characters).
fn name_label() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_string()),
        Just("b".to_string()),
        Just("ab".to_string()),
        Just("aab".to_string()),
        Just("a-b".to_string()),
        Just("x_1".to_string()),
        Just("".to_string()),
        Just("a b".to_string()),
        Just("*".to_string()),
        Just("-".to_string()),
        "[a-b_-]{1,3}",
    ]
}

fn selector() -> impl Strategy<Value = FqdnSelector> {
    prop_oneof![
        3 => prop::collection::vec(pattern_label(), 1..5).prop_filter_map("valid pattern", |labels| {
            FqdnPattern::parse(&labels.join(".")).ok().map(FqdnSelector::MatchPattern)
        }),
        1 => prop::collection::vec(name_label(), 1..5).prop_filter_map("valid name", |labels| {
            DnsName::parse_match_name(&labels.join(".")).ok().map(FqdnSelector::MatchName)
        }),
        1 => Just(FqdnSelector::MatchPattern(FqdnPattern::parse("*").unwrap())),
    ]
}

fn name() -> impl Strategy<Value = DnsName> {
    prop_oneof![
        9 => prop::collection::vec(name_label(), 1..6).prop_map(|l| DnsName::new(&l.join("."))),
        1 => Just(DnsName::new(".")),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn index_agrees_with_linear_matching(
        selectors in prop::collection::vec(selector(), 0..40),
        names in prop::collection::vec(name(), 1..20),
    ) {
        let index = PatternIndex::new(selectors.iter().enumerate().map(|(i, s)| (i as u32, s)));
        for name in &names {
            let expected: Vec<u32> = (0..selectors.len() as u32)
                .filter(|&i| selectors[i as usize].matches(name))
                .collect();
            prop_assert_eq!(index.matches(name), expected, "name {}", name);
        }
    }

    /// Removing selectors leaves the index answering for the rest only.
    #[test]
    fn index_after_removals_agrees_with_linear_matching(
        selectors in prop::collection::vec(selector(), 0..30),
        gone in prop::collection::vec(any::<bool>(), 30),
        names in prop::collection::vec(name(), 1..12),
    ) {
        let mut index = PatternIndex::new(selectors.iter().enumerate().map(|(i, s)| (i as u32, s)));
        for (i, s) in selectors.iter().enumerate() {
            if gone[i] {
                prop_assert!(index.remove(i as u32, s));
                prop_assert!(!index.remove(i as u32, s), "removed twice");
            }
        }
        prop_assert_eq!(index.len(), (0..selectors.len()).filter(|&i| !gone[i]).count());
        for name in &names {
            let expected: Vec<u32> = (0..selectors.len() as u32)
                .filter(|&i| !gone[i as usize] && selectors[i as usize].matches(name))
                .collect();
            prop_assert_eq!(index.matches(name), expected, "name {}", name);
        }
    }

    /// Names built to fit the patterns (so matches are frequent, not rare).
    #[test]
    fn index_agrees_on_names_derived_from_patterns(
        labels in prop::collection::vec(pattern_label(), 1..5),
        fills in prop::collection::vec(name_label(), 1..8),
        extra in prop::collection::vec(name_label(), 0..3),
    ) {
        let Ok(pattern) = FqdnPattern::parse(&labels.join(".")) else { return Ok(()); };
        let selector = FqdnSelector::MatchPattern(pattern);
        let index = PatternIndex::new([(7u32, &selector)]);
        // Replace each star run by a fill, optionally prefix extra labels.
        let mut k = 0;
        let mut filled: Vec<String> = extra.clone();
        for l in &labels {
            let mut out = String::new();
            let mut in_star = false;
            for ch in l.chars() {
                if ch == '*' {
                    if !in_star {
                        out.push_str(&fills[k % fills.len()]);
                        k += 1;
                    }
                    in_star = true;
                } else {
                    out.push(ch);
                    in_star = false;
                }
            }
            filled.push(out);
        }
        let name = DnsName::new(&filled.join("."));
        let expected = if selector.matches(&name) { vec![7] } else { vec![] };
        prop_assert_eq!(index.matches(&name), expected, "name {} pattern {}", name, selector.label_value());
    }
}
