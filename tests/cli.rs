//! The offline commands of the binary: `policy validate`, `policy trace --config`, config
//! errors, usage errors and exit statuses, exactly as the interface contract states them.

mod common;

use std::path::Path;

use common::*;

const GOOD: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: frontend-egress
spec:
  endpointSelector:
    matchLabels: {app: frontend}
  egress:
    - toEndpoints:
        - matchLabels: {app: backend}
      toPorts:
        - ports: [{port: "8080", protocol: TCP}]
    - toFQDNs:
        - matchPattern: "*.example.test"
      toPorts:
        - ports: [{port: "443", protocol: TCP}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: backend-ingress
spec:
  endpointSelector:
    matchLabels: {app: backend}
  ingress:
    - fromEndpoints:
        - matchLabels: {app: frontend}
      toPorts:
        - ports: [{port: "8080", protocol: TCP}]
"#;

const BAD: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: bad
spec:
  endpointSelector: {}
  egress:
    - toFQDNs:
        - matchName: "api.example.com/v1"
      toPort:
        - ports: [{port: "443"}]
    - toPorts:
        - ports:
            - port: "65536"
"#;

const CONFIG: &str = r#"policyDir: policies
stateDir: state
datapath: none
dns:
  listen: ["127.0.0.1:0"]
  upstreams: ["127.0.0.1"]
endpoints:
  - name: frontend
    labels: {app: frontend}
    ips: ["10.200.1.2"]
  - name: backend
    labels: {app: backend}
    ips: ["10.200.1.3"]
"#;

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn validate_reports_every_error_with_its_position_and_exits_1() {
    let d = tempdir();
    let good = write(d.path(), "good.yaml", GOOD);
    let bad = write(d.path(), "bad.yaml", BAD);
    let o = fqdnwall(&["policy", "validate", &good, &bad]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert_eq!(stdout(&o), format!("{good}: OK (2 policies, 2 rules)\n"));
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines,
        vec![
            format!("{bad}:9:22: spec.egress[0].toFQDNs[0].matchName: matchName \"api.example.com/v1\" contains '/'; only letters, digits, '-', '_' and '.' are allowed"),
            format!("{bad}:10:7: spec.egress[0].toPort: unknown field `toPort` (did you mean `toPorts`?)"),
            format!("{bad}:14:21: spec.egress[1].toPorts[0].ports[0].port: port 65536 is out of range 0-65535"),
            "1 of 2 files invalid".to_string(),
        ]
    );
}

#[test]
fn validate_good_files_exit_0() {
    let d = tempdir();
    let good = write(d.path(), "good.yaml", GOOD);
    let json_policy = write(
        d.path(),
        "rules.json",
        r#"[{"endpointSelector": {"matchLabels": {"app": "x"}}, "egress": [{"toEntities": ["world"]}]}]"#,
    );
    let o = fqdnwall(&["policy", "validate", &good, &json_policy]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        format!("{good}: OK (2 policies, 2 rules)\n{json_policy}: OK (1 policy, 1 rule)\n")
    );
    assert_eq!(stderr(&o), "");
}

#[test]
fn validate_a_directory_checks_the_files_the_agent_would_read() {
    let d = tempdir();
    let good = write(d.path(), "policies/a.yaml", GOOD);
    let bad = write(d.path(), "policies/b.yml", BAD);
    write(d.path(), "policies/notes.txt", "not a policy");
    write(d.path(), "policies/.hidden.yaml", BAD);
    let dir = d.path().join("policies").display().to_string();
    let o = fqdnwall(&["-o", "json", "policy", "validate", &dir]);
    assert_eq!(code(&o), 1);
    let v = json(&o);
    let files: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["file"].as_str().unwrap())
        .collect();
    assert_eq!(files, vec![good.as_str(), bad.as_str()]);
}

#[test]
fn validate_json_is_machine_readable() {
    let d = tempdir();
    let good = write(d.path(), "good.yaml", GOOD);
    let bad = write(d.path(), "bad.yaml", BAD);
    let o = fqdnwall(&["-o", "json", "policy", "validate", &good, &bad]);
    assert_eq!(code(&o), 1);
    assert_eq!(stderr(&o), "", "json mode keeps errors in the document");
    let v = json(&o);
    assert_eq!(v[0]["file"], good.as_str());
    assert_eq!(v[0]["valid"], true);
    assert_eq!(v[0]["policies"], 2);
    assert_eq!(v[0]["rules"], 2);
    assert_eq!(v[0]["errors"], serde_json::json!([]));
    assert_eq!(v[1]["valid"], false);
    assert_eq!(v[1]["errors"].as_array().unwrap().len(), 3);
    assert_eq!(
        v[1]["errors"][1],
        serde_json::json!({
            "line": 10, "column": 7, "path": "spec.egress[0].toPort",
            "message": "unknown field `toPort` (did you mean `toPorts`?)"
        })
    );
}

#[test]
fn unreadable_file_is_an_io_error() {
    let d = tempdir();
    let missing = d.path().join("missing.yaml").display().to_string();
    let o = fqdnwall(&["policy", "validate", &missing]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).starts_with(&format!("{missing}: cannot read: ")),
        "{}",
        stderr(&o)
    );
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        vec!["policy", "trace", "--src", "endpoint:a"],
        vec!["no-such-command"],
        vec!["policy", "validate"],
        vec!["-o", "yaml", "status"],
        vec!["monitor", "--type", "everything"],
    ] {
        let o = fqdnwall(&args);
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).starts_with("error:"), "{args:?}: {}", stderr(&o));
    }
    let d = tempdir();
    let cfg = write(d.path(), "config.yaml", CONFIG);
    for (sel, msg) in [
        ("pod:web", "invalid selector \"pod:web\""),
        ("ip:300.1.1.1", "invalid IP address \"300.1.1.1\""),
        ("entity:internet", "unknown entity \"internet\""),
    ] {
        let o = fqdnwall(&[
            "policy",
            "trace",
            "--config",
            &cfg,
            "--src",
            sel,
            "--dst",
            "entity:world",
            "--dport",
            "443",
        ]);
        assert_eq!(code(&o), 2, "{sel}");
        assert!(stderr(&o).contains(msg), "{sel}: {}", stderr(&o));
    }
    let o = fqdnwall(&[
        "policy",
        "trace",
        "--config",
        &cfg,
        "--src",
        "entity:host",
        "--dst",
        "entity:world",
        "--dport",
        "443/HTTP",
    ]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("unknown protocol \"HTTP\""));
}

#[test]
fn help_and_version_exit_0() {
    let o = fqdnwall(&["--help"]);
    assert_eq!(code(&o), 0);
    for cmd in [
        "run", "policy", "endpoint", "config", "identity", "bpf", "fqdn", "monitor", "status",
        "lockdown",
    ] {
        assert!(stdout(&o).contains(cmd), "--help lists {cmd}");
    }
    let o = fqdnwall(&["--version"]);
    assert_eq!(code(&o), 0);
    assert!(stdout(&o).starts_with("fqdnwall "));
}

#[test]
fn live_commands_without_an_agent_are_io_errors() {
    let d = tempdir();
    let sock = d.path().join("none.sock").display().to_string();
    for args in [
        vec!["status"],
        vec!["endpoint", "list"],
        vec!["policy", "get"],
        vec!["identity", "get", "1"],
        vec!["bpf", "ipcache", "list"],
        vec![
            "policy",
            "trace",
            "--src",
            "entity:host",
            "--dst",
            "entity:world",
            "--dport",
            "53",
        ],
    ] {
        let mut all = vec!["--api-socket", sock.as_str()];
        all.extend(args.iter());
        let o = fqdnwall(&all);
        assert_eq!(code(&o), 2, "{args:?}");
        assert!(
            stderr(&o).contains(&format!("cannot reach the fqdnwall agent at {sock}")),
            "{args:?}: {}",
            stderr(&o)
        );
    }
    // The environment variable names the socket too.
    let o = std::process::Command::new(BIN)
        .arg("status")
        .env("FQDNWALL_API_SOCKET", &sock)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains(&sock));
}

#[test]
fn config_errors_are_reported_with_positions_and_exit_1() {
    let d = tempdir();
    let cfg = write(
        d.path(),
        "config.yaml",
        "policyDirr: x\n\
         datapath: ebpf\n\
         dns:\n  listen: [\"127.0.0.1\"]\n  responseMaxDelay: soon\n\
         endpoints:\n  - name: a\n    ips: [\"10.0.0.1\"]\n  - name: a\n    ips: [\"10.0.0.1\", \"10.0.0.300\"]\n    lables: {}\n",
    );
    let o = fqdnwall(&["run", "--config", &cfg]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines,
        vec![
            format!("{cfg}:1:1: policyDirr: unknown field `policyDirr` (did you mean `policyDir`?)"),
            format!("{cfg}:2:11: datapath: unknown datapath \"ebpf\"; expected auto, bpf or none"),
            format!("{cfg}:4:12: dns.listen[0]: invalid listen address \"127.0.0.1\"; write `127.0.0.1:5353` or `[::1]:5353`"),
            format!("{cfg}:5:21: dns.responseMaxDelay: invalid duration \"soon\"; write e.g. `100ms` or `10s`"),
            format!("{cfg}:9:11: endpoints[1].name: endpoint name \"a\" is already used by endpoints[0]"),
            format!("{cfg}:10:11: endpoints[1].ips[0]: address 10.0.0.1 is already used by endpoint \"a\""),
            format!("{cfg}:10:23: endpoints[1].ips[1]: invalid IP address \"10.0.0.300\""),
            format!("{cfg}:11:5: endpoints[1].lables: unknown field `lables` (did you mean `labels`?)"),
            format!("fqdnwall: {cfg}: 8 errors in the configuration"),
        ]
    );
    // The same checks apply to an offline trace.
    let o = fqdnwall(&[
        "policy",
        "trace",
        "--config",
        &cfg,
        "--src",
        "entity:host",
        "--dst",
        "entity:world",
        "--dport",
        "53",
    ]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("policyDirr: unknown field"));
    // A missing config file is an I/O error.
    let o = fqdnwall(&["run", "--config", "/nonexistent/fqdnwall.yaml"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("cannot read config /nonexistent/fqdnwall.yaml"));
}

fn trace(cfg: &str, src: &str, dst: &str, dport: &str) -> (i32, serde_json::Value) {
    let o = fqdnwall(&[
        "-o", "json", "policy", "trace", "--config", cfg, "--src", src, "--dst", dst, "--dport",
        dport,
    ]);
    let c = code(&o);
    assert!(c == 0 || c == 1, "{src} -> {dst}: {}", stderr(&o));
    (c, json(&o))
}

#[test]
fn offline_trace_verdicts_rules_and_json_shape() {
    let d = tempdir();
    let cfg = write(d.path(), "config.yaml", CONFIG);
    let policy = write(d.path(), "policies/app.yaml", GOOD);
    // A broken file in the directory is reported and the others still count.
    write(d.path(), "policies/broken.yaml", BAD);

    let (c, v) = trace(&cfg, "endpoint:frontend", "endpoint:backend", "8080");
    assert_eq!(c, 0);
    assert_eq!(v["verdict"], "allowed");
    assert_eq!(v["egress"]["verdict"], "allowed");
    assert_eq!(v["ingress"]["verdict"], "allowed");
    assert_eq!(v["egress"]["enforced"], true);
    assert_eq!(v["egress"]["endpoint"], "frontend");
    assert_eq!(v["ingress"]["endpoint"], "backend");
    let rule = &v["egress"]["rules"][0];
    assert_eq!(rule["policy"], "default/frontend-egress");
    assert_eq!(rule["file"], policy.as_str());
    assert_eq!(rule["kind"], "CiliumNetworkPolicy");
    assert_eq!(
        v["ingress"]["rules"][0]["policy"],
        "default/backend-ingress"
    );
    assert_eq!(v["dport"], 8080);
    assert_eq!(v["protocol"], "TCP");
    assert_eq!(v["mode"], "offline");
    assert!(v["src"]["identity"].as_u64().unwrap() >= 256);
    assert!(v["src"]["labels"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!("k8s:app=frontend")));
    for side in ["egress", "ingress"] {
        for key in [
            "verdict",
            "rules",
            "enforced",
            "endpoint",
            "reason",
            "proxyPort",
        ] {
            assert!(v[side].get(key).is_some(), "{side}.{key} missing");
        }
    }

    // Another port: the frontend's egress is enforced, nothing allows it.
    let (c, v) = trace(&cfg, "endpoint:frontend", "endpoint:backend", "9090");
    assert_eq!(c, 1);
    assert_eq!(v["verdict"], "denied");
    assert_eq!(v["egress"]["verdict"], "denied");
    assert!(v["egress"]["reason"]
        .as_str()
        .unwrap()
        .contains("default deny"));

    // Ingress of the backend decides for a source it does not allow.
    let (c, v) = trace(&cfg, "labels:app=other", "endpoint:backend", "8080");
    assert_eq!(c, 1);
    assert_eq!(v["egress"]["verdict"], "allowed");
    assert_eq!(v["ingress"]["verdict"], "denied");
    assert_eq!(v["egress"]["endpoint"], "labels:app=other");

    // A world IP offline: no name was looked up, so toFQDNs allows nothing yet.
    let (c, v) = trace(&cfg, "endpoint:frontend", "ip:192.0.2.10", "443");
    assert_eq!(c, 1);
    assert_eq!(v["dst"]["identity"], 9);

    // Text output names the verdict and the rule with its file.
    let o = fqdnwall(&[
        "policy",
        "trace",
        "--config",
        &cfg,
        "--src",
        "endpoint:frontend",
        "--dst",
        "endpoint:backend",
        "--dport",
        "8080/tcp",
    ]);
    assert_eq!(code(&o), 0);
    let text = stdout(&o);
    assert!(text.contains("Verdict: allowed"), "{text}");
    assert!(
        text.contains(&format!(
            "rule default/frontend-egress (CiliumNetworkPolicy) at {policy}:"
        )),
        "{text}"
    );
    assert!(
        stderr(&o).contains("broken.yaml"),
        "the refused file is named"
    );

    // Unknown endpoint names are usage errors.
    let o = fqdnwall(&[
        "policy",
        "trace",
        "--config",
        &cfg,
        "--src",
        "endpoint:nope",
        "--dst",
        "entity:world",
        "--dport",
        "80",
    ]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("no endpoint \"nope\""));
}

#[test]
fn offline_trace_in_audit_mode_reports_audit_and_exits_0() {
    let d = tempdir();
    let cfg = write(
        d.path(),
        "config.yaml",
        &format!("policyAuditMode: true\n{CONFIG}"),
    );
    write(d.path(), "policies/app.yaml", GOOD);
    let (c, v) = trace(&cfg, "endpoint:frontend", "endpoint:backend", "9090");
    assert_eq!(c, 0);
    assert_eq!(v["verdict"], "audit");
    assert_eq!(v["egress"]["verdict"], "audit");
}

#[test]
fn lockdown_checks_its_policy_then_confines_the_command() {
    let d = tempdir();
    let bad = write(d.path(), "bad.yaml", BAD);
    let o = fqdnwall(&["lockdown", "--policy", &bad, "--", "true"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains(":9:22: spec.egress[0].toFQDNs[0].matchName"));
    let good = write(d.path(), "good.yaml", GOOD);
    let marker = d.path().join("ran");
    let o = fqdnwall(&[
        "lockdown",
        "--policy",
        &good,
        "--label",
        "app=frontend",
        "--",
        "touch",
        marker.to_str().unwrap(),
    ]);
    if is_root() {
        // Confined in its own network namespace; the file system is the host's.
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        assert!(marker.exists());
        assert!(
            stderr(&o).contains("fqdnwall lockdown: summary"),
            "{}",
            stderr(&o)
        );
    } else {
        assert_eq!(code(&o), 2);
        assert!(stderr(&o).contains("needs root"), "{}", stderr(&o));
        assert!(!marker.exists(), "the command must not run unconfined");
    }
}

#[test]
fn datapath_bpf_needs_existing_interfaces() {
    let d = tempdir();
    let cfg = write(
        d.path(),
        "config.yaml",
        "datapath: bpf\nendpoints:\n  - name: web\n    ips: [\"10.0.0.5\"]\n",
    );
    let o = fqdnwall(&["run", "--config", &cfg]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains(&format!(
            "{cfg}:3:5: endpoints[0].interface: endpoint \"web\" needs `interface` with `datapath: bpf` (the host side of its veth)"
        )),
        "{}",
        stderr(&o)
    );
    // An interface that does not exist: the agent says which and stops (pins of its own in
    // a directory of this test, removed below).
    let cfg = write(
        d.path(),
        "config2.yaml",
        "datapath: bpf\nstateDir: state\nendpoints:\n  - name: web\n    ips: [\"10.0.0.5\"]\n    interface: fwnosuch0\n",
    );
    if !is_root() {
        return;
    }
    let pin = format!("/sys/fs/bpf/fqdnwall-cli-{}", std::process::id());
    let o = std::process::Command::new(BIN)
        .args(["run", "--config", &cfg, "--api-socket"])
        .arg(d.path().join("api.sock"))
        .env("FQDNWALL_BPF_PIN_DIR", &pin)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    // A failed first start leaves no pins behind.
    let links = std::fs::read_dir(format!("{pin}/links"))
        .map(|d| d.count())
        .unwrap_or(0);
    let maps = std::fs::read_dir(format!("{pin}/maps"))
        .map(|d| d.count())
        .unwrap_or(0);
    let _ = std::fs::remove_dir_all(&pin);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("fwnosuch0"), "{}", stderr(&o));
    assert_eq!((links, maps), (0, 0), "pins left after a failed start");
}
