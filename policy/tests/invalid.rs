//! Invalid input: each fixture in `tests/fixtures/invalid` exercises one error class, and the
//! test pins the exact `FILE:LINE:COLUMN: path: message` of every diagnostic it must produce.

use std::path::{Path, PathBuf};

use policy::parse::{parse_policies, parse_policy_file};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/invalid")
        .join(name)
}

/// Diagnostics of a fixture, with the directory part of the file name removed.
fn diagnostics(name: &str) -> Vec<String> {
    let path = fixture(name);
    let prefix = format!("{}/", path.parent().unwrap().display());
    match parse_policy_file(&path) {
        Ok(p) => panic!("{name}: parsed without error into {} policies", p.len()),
        Err(d) => d
            .iter()
            .map(|d| d.to_string().strip_prefix(&prefix).unwrap().to_string())
            .collect(),
    }
}

/// (fixture, every diagnostic it produces, in order).
const CASES: &[(&str, &[&str])] = &[
    ("yaml-syntax.yaml", &["yaml-syntax.yaml:10:1: YAML syntax error: while parsing a flow sequence, expected ',' or ']'"]),
    ("duplicate-key.yaml", &["duplicate-key.yaml:8:3: duplicate key \"egress\" (first at line 7, column 3)"]),
    ("merge-key.yaml", &["merge-key.yaml:9:7: YAML merge keys (<<) are not supported; write the fields out"]),
    ("unknown-field.yaml", &["unknown-field.yaml:9:5: spec.egress[0].toPort: unknown field `toPort` (did you mean `toPorts`?)"]),
    ("wrong-type.yaml", &["wrong-type.yaml:8:14: spec.egress[0].toPorts: expected a list, found a string"]),
    ("not-a-policy-kind.yaml", &["not-a-policy-kind.yaml:2:7: kind: kind Pod is not a policy kind (expected CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy or NetworkPolicy)"]),
    ("wrong-api-version.yaml", &["wrong-api-version.yaml:1:13: apiVersion: apiVersion cilium.io/v1 is not valid for kind CiliumNetworkPolicy; expected cilium.io/v2"]),
    ("missing-name.yaml", &["missing-name.yaml:4:3: metadata: missing field `name`"]),
    ("ccnp-namespace.yaml", &["ccnp-namespace.yaml:5:14: metadata.namespace: a CiliumClusterwideNetworkPolicy is cluster-scoped and has no namespace"]),
    ("duplicate-policy.yaml", &["duplicate-policy.yaml:6:1: metadata.name: CiliumNetworkPolicy default/p is defined twice in this file (first at line 1)"]),
    ("missing-selector.yaml", &["missing-selector.yaml:6:3: spec: missing field `endpointSelector` (or `nodeSelector`): every rule selects the endpoints it applies to"]),
    ("both-selectors.yaml", &["both-selectors.yaml:7:3: spec.nodeSelector: a rule has either endpointSelector or nodeSelector, not both"]),
    ("node-selector-in-cnp.yaml", &["node-selector-in-cnp.yaml:6:3: spec.nodeSelector: nodeSelector is only allowed in a CiliumClusterwideNetworkPolicy (or a plain rule list)"]),
    ("endpoint-selector-other-namespace.yaml", &["endpoint-selector-other-namespace.yaml:8:5: spec.endpointSelector: the endpointSelector of a policy in namespace \"a\" only selects endpoints of that namespace; it cannot select io.kubernetes.pod.namespace (use a CiliumClusterwideNetworkPolicy)"]),
    ("no-sections.yaml", &["no-sections.yaml:6:3: spec: rule must have at least one of ingress, ingressDeny, egress, egressDeny"]),
    ("selector-operator.yaml", &["selector-operator.yaml:11:19: spec.ingress[0].fromEndpoints[0].matchExpressions[0].operator: unknown operator \"Like\"; expected In, NotIn, Exists or DoesNotExist"]),
    ("label-value.yaml", &["label-value.yaml:10:14: spec.ingress[0].fromEndpoints[0].matchLabels.app: invalid label value \"my app\": at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"]),
    ("entity-unknown.yaml", &["entity-unknown.yaml:8:18: spec.egress[0].toEntities[0]: unknown entity \"internet\"; expected one of: all, world, world-ipv4, world-ipv6, cluster, host, remote-node, kube-apiserver, ingress, init, health, unmanaged"]),
    ("match-name-chars.yaml", &["match-name-chars.yaml:9:18: spec.egress[0].toFQDNs[0].matchName: matchName \"api.example.com/v1\" contains '/'; only letters, digits, '-', '_' and '.' are allowed"]),
    ("match-pattern-too-long.yaml", &["match-pattern-too-long.yaml:9:21: spec.egress[0].toFQDNs[0].matchPattern: matchPattern is 266 characters long, at most 255 are allowed"]),
    ("match-name-and-pattern.yaml", &["match-name-and-pattern.yaml:10:21: spec.egress[0].toFQDNs[0].matchPattern: only one of matchName and matchPattern may be given per entry"]),
    ("fqdn-combined.yaml", &["fqdn-combined.yaml:9:5: spec.egress[0].toFQDNs: toFQDNs cannot be combined with toEndpoints in one rule (Cilium rejects it too); write them as separate rules"]),
    ("deny-fqdn.yaml", &["deny-fqdn.yaml:8:5: spec.egressDeny[0].toFQDNs: toFQDNs is not allowed in egressDeny rules"]),
    ("deny-l7.yaml", &["deny-l7.yaml:10:7: spec.egressDeny[0].toPorts[0].rules: rules is not allowed in egressDeny rules: deny rules have no L7 part"]),
    ("port-out-of-range.yaml", &["port-out-of-range.yaml:10:15: spec.ingress[0].toPorts[0].ports[0].port: port 65536 is out of range 0-65535"]),
    ("port-bad-name.yaml", &["port-bad-name.yaml:10:15: spec.ingress[0].toPorts[0].ports[0].port: invalid port \"http_alt\": expected a number 0-65535 or a port name (IANA service name: up to 15 letters, digits and '-', at least one letter)"]),
    ("endport-below-port.yaml", &["endport-below-port.yaml:11:18: spec.ingress[0].toPorts[0].ports[0].endPort: endPort 8000 is below port 8080"]),
    ("endport-named.yaml", &["endport-named.yaml:11:18: spec.ingress[0].toPorts[0].ports[0].endPort: endPort cannot be used with the named port \"http\""]),
    ("cidr-invalid.yaml", &["cidr-invalid.yaml:9:7: spec.egress[0].toCIDR[0]: \"10.0.0.0/33\" is not a valid CIDR (e.g. 10.0.0.0/8, 2001:db8::/32) or IP address"]),
    ("cidr-except-outside.yaml", &["cidr-except-outside.yaml:11:9: spec.egress[0].toCIDRSet[0].except[0]: except 192.168.0.0/16 is not within 10.0.0.0/8"]),
    ("protocol-unknown.yaml", &["protocol-unknown.yaml:11:19: spec.ingress[0].toPorts[0].ports[0].protocol: unknown protocol \"HTTP\"; expected TCP, UDP, SCTP or ANY"]),
    ("protocol-icmp-in-ports.yaml", &["protocol-icmp-in-ports.yaml:11:19: spec.ingress[0].toPorts[0].ports[0].protocol: protocol ICMP is not a port protocol; allow ICMP types with `icmps: [{fields: [{type: ..., family: IPv4|IPv6}]}]`"]),
    ("icmp-type-range.yaml", &["icmp-type-range.yaml:10:15: spec.ingress[0].icmps[0].fields[0].type: ICMP type 256 is out of range 0-255"]),
    ("icmp-type-name-family.yaml", &["icmp-type-name-family.yaml:10:15: spec.ingress[0].icmps[0].fields[0].type: unknown IPv4 ICMP type \"PacketTooBig\"; expected a number 0-255 or one of: EchoReply, DestinationUnreachable, Redirect, Echo, EchoRequest, RouterAdvertisement, RouterSelection, TimeExceeded, ParameterProblem, Timestamp, TimestampReply, Photuris, ExtendedEchoRequest, ExtendedEchoReply"]),
    ("icmp-family.yaml", &["icmp-family.yaml:11:17: spec.ingress[0].icmps[0].fields[0].family: unknown ICMP family \"IPv5\"; expected IPv4 or IPv6"]),
    ("icmps-with-toports.yaml", &["icmps-with-toports.yaml:10:5: spec.ingress[0].icmps: icmps cannot be combined with toPorts in one rule (as in Cilium); write a separate rule for the ICMP types"]),
    ("http-regex.yaml", &["http-regex.yaml:12:17: spec.ingress[0].toPorts[0].rules.http[0].path: invalid regular expression \"/api/(v1\": error: unclosed group"]),
    ("http-header.yaml", &["http-header.yaml:12:21: spec.ingress[0].toPorts[0].rules.http[0].headers[0]: invalid header \": no name\": expected \"Name: value\" or \"Name\""]),
    ("header-match-mismatch.yaml", &["header-match-mismatch.yaml:15:23: spec.ingress[0].toPorts[0].rules.http[0].headerMatches[0].mismatch: unknown mismatch action \"OVERWRITE\"; expected LOG, ADD, DELETE or REPLACE"]),
    ("kafka-role-and-apikey.yaml", &["kafka-role-and-apikey.yaml:13:19: spec.ingress[0].toPorts[0].rules.kafka[0].apiKey: cannot set both role \"produce\" and apiKey \"fetch\""]),
    ("kafka-apikey-unknown.yaml", &["kafka-apikey-unknown.yaml:12:19: spec.ingress[0].toPorts[0].rules.kafka[0].apiKey: unknown Kafka apiKey \"createtopic\" (names as in the Kafka protocol, e.g. produce, fetch, metadata)"]),
    ("kafka-role-unknown.yaml", &["kafka-role-unknown.yaml:12:17: spec.ingress[0].toPorts[0].rules.kafka[0].role: invalid Kafka role \"admin\"; expected produce or consume"]),
    ("kafka-topic.yaml", &["kafka-topic.yaml:12:18: spec.ingress[0].toPorts[0].rules.kafka[0].topic: invalid Kafka topic \"orders/eu\": '/' is not allowed (letters, digits, '.', '_', '-')"]),
    ("kafka-apiversion.yaml", &["kafka-apiversion.yaml:12:23: spec.ingress[0].toPorts[0].rules.kafka[0].apiVersion: invalid Kafka apiVersion \"-1\": expected a number 0-32767"]),
    ("dns-port-range.yaml", &["dns-port-range.yaml:9:15: spec.egress[0].toPorts[0].ports[0]: DNS rules do not support port ranges"]),
    ("dns-ingress.yaml", &["dns-ingress.yaml:12:11: spec.ingress[0].toPorts[0].rules.dns: DNS rules are not allowed on ingress"]),
    ("dns-no-port.yaml", &["dns-no-port.yaml:11:11: spec.egress[0].toPorts[0].rules.dns: DNS rules need an explicit port (usually port 53 with protocol ANY)"]),
    ("l7-no-port.yaml", &[
        "l7-no-port.yaml:12:11: spec.ingress[0].toPorts[0].rules.http: http rules need an explicit TCP port (`ports: [{port: \"80\", protocol: TCP}]`)",
        "l7-no-port.yaml:17:16: spec.egress[0].toPorts[0].rules.kafka: kafka rules need an explicit TCP port (`ports: [{port: \"80\", protocol: TCP}]`)",
    ]),
    ("l7-two-protocols.yaml", &["l7-two-protocols.yaml:12:9: spec.egress[0].toPorts[0].rules.kafka: only one L7 protocol per toPorts entry: http and kafka given"]),
    ("l7-non-tcp.yaml", &["l7-non-tcp.yaml:9:15: spec.egress[0].toPorts[0].ports[0]: http rules only apply to TCP ports (not UDP); set `protocol: TCP`"]),
    ("l7-port-zero.yaml", &["l7-port-zero.yaml:9:15: spec.egress[0].toPorts[0].ports[0]: L7 rules cannot be used when a port is 0 (every port)"]),
    ("l7-host-policy.yaml", &["l7-host-policy.yaml:11:15: spec.egress[0].toPorts[0].rules.http: http rules are not supported in host policies (nodeSelector), as in Cilium; host policies take DNS rules only"]),
    // The DNS rules of the host's egress are accepted; Kafka there and DNS on ingress are not.
    ("l7-host-policy-kafka.yaml", &[
        "l7-host-policy-kafka.yaml:16:16: spec.egress[1].toPorts[0].rules.kafka: kafka rules are not supported in host policies (nodeSelector), as in Cilium; host policies take DNS rules only",
        "l7-host-policy-kafka.yaml:21:14: spec.ingress[0].toPorts[0].rules.dns: DNS rules are not allowed on ingress",
    ]),
    ("netpol-ipblock-combined.yaml", &["netpol-ipblock-combined.yaml:11:9: spec.ingress[0].from[0].ipBlock: ipBlock cannot be combined with podSelector or namespaceSelector in one peer"]),
    ("netpol-policy-type.yaml", &["netpol-policy-type.yaml:7:26: spec.policyTypes[1]: unknown policy type \"Outbound\"; expected Ingress or Egress"]),
    ("netpol-port.yaml", &[
        "netpol-port.yaml:9:13: spec.ingress[0].ports[0].port: port 0 is out of range 1-65535",
        "netpol-port.yaml:10:17: spec.ingress[0].ports[1].protocol: unsupported protocol \"ICMP\"; expected TCP, UDP or SCTP",
    ]),
    ("unsupported-features.yaml", &[
        "unsupported-features.yaml:8:5: spec.ingress[0].fromGroups: fromGroups (cloud provider security groups) is not supported yet",
        "unsupported-features.yaml:10:28: spec.ingress[1].authentication.mode: authentication (mutual authentication) is not supported yet",
        "unsupported-features.yaml:12:19: spec.egress[0].toServices[0].k8sService: toServices (selecting Kubernetes service backends) is not supported yet",
        "unsupported-features.yaml:13:18: spec.egress[1].toCIDRSet[0].cidrGroupRef: cidrGroupRef (CiliumCIDRGroup) is not supported yet; list the CIDRs",
        "unsupported-features.yaml:16:7: spec.egress[2].toPorts[0].listener: listener (redirect to a custom Envoy listener) is not supported yet",
        "unsupported-features.yaml:19:7: spec.egress[3].toPorts[0].terminatingTLS: terminatingTLS (TLS interception by the L7 proxy) is not supported yet",
        "unsupported-features.yaml:23:9: spec.egress[4].toPorts[0].rules.l7proto: l7proto: generic L7 protocol rules (proxylib) are not supported yet",
        "unsupported-features.yaml:25:26: spec.egress[5].toPorts[0].ports[0].protocol: protocol VRRP (extended IP protocols) is not supported yet; expected TCP, UDP, SCTP or ANY",
    ]),
    ("multiple-errors.yaml", &[
        "multiple-errors.yaml:4:9: metadata.name: invalid name \"Bad_Name\": lower-case letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters",
        "multiple-errors.yaml:11:18: spec.egress[0].toFQDNs[0].matchName: matchName \"bad name.com\" contains ' '; only letters, digits, '-', '_' and '.' are allowed",
        "multiple-errors.yaml:14:15: spec.egress[0].toPorts[0].ports[0].port: port 99999 is out of range 0-65535",
        "multiple-errors.yaml:16:18: spec.egress[1].toEntities[0]: unknown entity \"wrld\"; expected one of: all, world, world-ipv4, world-ipv6, cluster, host, remote-node, kube-apiserver, ingress, init, health, unmanaged",
        "multiple-errors.yaml:18:16: spec.ingress[0].fromCIDR[0]: \"not-a-cidr\" is not a valid CIDR (e.g. 10.0.0.0/8, 2001:db8::/32) or IP address",
        "multiple-errors.yaml:19:5: spec.ingress[0].unknownThing: unknown field `unknownThing`; expected one of: fromEndpoints, fromCIDR, fromCIDRSet, fromEntities, fromNodes, fromGroups, fromRequires, toPorts, icmps, authentication",
        "multiple-errors.yaml:27:17: spec.policyTypes[0]: unknown policy type \"Sideways\"; expected Ingress or Egress",
    ]),
];

#[test]
fn every_fixture_has_its_exact_diagnostics() {
    let mut failures = Vec::new();
    for (name, expected) in CASES {
        let got = diagnostics(name);
        if got != *expected {
            failures.push(format!(
                "{name}:\n  expected:\n    {}\n  got:\n    {}",
                expected.join("\n    "),
                got.join("\n    ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_fixture_is_covered() {
    let dir = fixture("");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for n in &names {
        assert!(
            CASES.iter().any(|(c, _)| c == n),
            "fixture {n} has no expected diagnostics"
        );
    }
    assert_eq!(names.len(), CASES.len());
}

#[test]
fn the_file_name_is_used_verbatim() {
    let e =
        parse_policies("some/dir/x.yaml", "kind: Deployment\napiVersion: apps/v1\n").unwrap_err();
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].to_string(), "some/dir/x.yaml:1:7: kind: kind Deployment is not a policy kind (expected CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy or NetworkPolicy)");
    assert_eq!(&*e[0].file, "some/dir/x.yaml");
    assert_eq!(e[0].path, "kind");
}

#[test]
fn a_bad_document_fails_the_whole_file() {
    let text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: good}\nspec: {endpointSelector: {}, ingress: [{}]}\n---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: bad}\nspec: {endpointSelector: {}, ingress: [{fromEntities: [moon]}]}\n";
    let e = parse_policies("f.yaml", text).unwrap_err();
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].span.line, 9);
}

#[test]
fn field_name_case_and_duplicates() {
    // Go-style case-insensitive field names are accepted (Cilium's examples use `HTTP:`) ...
    let ok = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  Ingress: [{}]\n";
    assert!(parse_policies("f.yaml", ok).is_ok());
    // ... but the same field twice in different case is an error.
    let dup = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  ingress: [{}]\n  Ingress: [{}]\n";
    let e = parse_policies("f.yaml", dup).unwrap_err();
    assert_eq!(e[0].to_string(), "f.yaml:7:3: spec.ingress: field `ingress` is given twice (field names are compared ignoring case)");
}
