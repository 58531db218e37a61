//! Learned state when the state directory stops taking writes, end to end: the agent backs
//! off (one attempt, and one log line, per step of 1 s, 2 s, 4 s … rather than a full
//! snapshot every second), keeps learning, shows it in `fqdnwall_state_write_failures_total`
//! and `fqdnwall_state_write_failing`, and once the directory takes writes again (or at a
//! clean stop) writes everything learned meanwhile, which a restart restores. The directory
//! is made to refuse writes with `chattr +i` on it and on the journal (root, a file system
//! that honours the flag for descriptors already open, as ext4 does), with a real unbound
//! upstream and real `dig`.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Every name lives ten minutes: nothing learned expires while a test runs.
const ZONE: &str = r#"$ORIGIN example.test.
$TTL 600
@ IN SOA ns.example.test. admin.example.test. 1 3600 600 86400 5
@ IN NS ns.example.test.
ns IN A 127.0.0.1
www IN A 192.0.2.10
early IN A 192.0.2.21
late IN A 192.0.2.22
after IN A 192.0.2.23
"#;

/// The frontend may resolve and reach (443) every name of the zone; the upstream's
/// address is put in for `UPSTREAM`.
const POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: frontend-persist
spec:
  endpointSelector:
    matchLabels: {app: frontend}
  egress:
    - toCIDR: ["UPSTREAM/32"]
      toPorts:
        - ports: [{port: "53", protocol: ANY}]
          rules:
            dns:
              - matchPattern: "*.example.test"
    - toFQDNs:
        - matchPattern: "*.example.test"
      toPorts:
        - ports: [{port: "443", protocol: TCP}]
"#;

/// A test's bed: unbound on `ip` port 53 (a loopback address of the test's own), the config
/// and policy in a temporary directory; `None` (a skip, a failure under CI=true) without
/// root, unbound, dig or chattr.
struct Bed {
    _upstream: Unbound,
    dir: tempfile::TempDir,
    config: String,
    socket: PathBuf,
}

impl Bed {
    /// Learns www.example.test through `a` and waits until the journal holds the batch.
    fn first_batch(&self, a: &Agent) {
        learn(a, "www.example.test");
        eventually(Duration::from_secs(5), "the first batch", || {
            (self.journal_len() > 8).then_some(())
        });
    }

    fn new(ip: &str) -> Option<Bed> {
        if !is_root() {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("the persistence tests run as root in CI");
            }
            eprintln!("*** SKIPPED: an upstream on port 53 and chattr need root");
            return None;
        }
        require("chattr", "e2fsprogs")?;
        let upstream = Unbound::start_zones(
            ip.parse().unwrap(),
            53,
            &[("example.test.", ZONE)],
            "www.example.test",
        )?;
        let dir = tempdir();
        let config = format!(
            r#"policyDir: policies
stateDir: state
datapath: none
dns:
  listen: ["127.0.0.1:0"]
  upstreams: ["{}"]
  forwardTimeout: 3s
endpoints:
  - name: frontend
    labels: {{app: frontend}}
    ips: ["127.0.0.2"]
metrics:
  listen: 127.0.0.1:0
"#,
            upstream.addr
        );
        write(dir.path(), "config.yaml", &config);
        write(
            dir.path(),
            "policies/frontend.yaml",
            &POLICY.replace("UPSTREAM", ip),
        );
        Some(Bed {
            _upstream: upstream,
            config: dir.path().join("config.yaml").display().to_string(),
            socket: dir.path().join("api.sock"),
            dir,
        })
    }

    fn start(&self) -> Agent {
        Agent::start(&["--config", &self.config], &self.socket)
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn journal_len(&self) -> u64 {
        std::fs::metadata(self.state().join("fqdn-cache.journal"))
            .map(|m| m.len())
            .unwrap_or(0)
    }
}

/// `chattr +i` on each path, undone when dropped (a failed test must leave a directory that
/// can be removed).
struct Immutable(Vec<PathBuf>);

impl Immutable {
    fn set(paths: &[PathBuf]) -> Immutable {
        let guard = Immutable(paths.to_vec());
        for p in paths {
            let st = Command::new("chattr").arg("+i").arg(p).status().unwrap();
            assert!(st.success(), "chattr +i {}: {st:?}", p.display());
        }
        guard
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = Command::new("chattr").arg("-i").arg(p).status();
        }
    }
}

/// The directory's file system refuses writes through a descriptor opened before the file
/// became immutable (the agent keeps its journal open): otherwise the test cannot work.
fn check_immutable_refuses_open_writers(dir: &Path) {
    let probe = dir.join("probe");
    let mut f = std::fs::File::create(&probe).unwrap();
    let guard = Immutable::set(std::slice::from_ref(&probe));
    let written = f.write_all(b"x");
    drop(guard);
    assert!(
        written.is_err(),
        "the file system of {} lets an open descriptor write to an immutable file; this test \
         needs one that does not (ext4 on the CI machine)",
        dir.display()
    );
    std::fs::remove_file(&probe).unwrap();
}

fn learn(a: &Agent, name: &str) {
    let r = dig(&a.dns, "127.0.0.2", name, "A", false).expect("reply");
    assert_eq!(r.status, "NOERROR", "{name}");
}

fn allowed(a: &Agent, ip: &str) -> bool {
    let o = a.cmd(&[
        "-o",
        "json",
        "policy",
        "trace",
        "--src",
        "endpoint:frontend",
        "--dst",
        &format!("ip:{ip}"),
        "--dport",
        "443",
    ]);
    let c = code(&o);
    assert!(c == 0 || c == 1, "trace failed: {}", stderr(&o));
    c == 0
}

fn learned_names(a: &Agent) -> Vec<String> {
    let rows = a.json(&["fqdn", "cache", "list", "--endpoint", "frontend"]);
    let mut names: Vec<String> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

/// The value of an unlabelled metric.
fn metric(a: &Agent, name: &str) -> f64 {
    a.metric(name)
        .unwrap_or_else(|| panic!("no {name} in the agent's metrics"))
}

/// The number before `needle` in `line` ("… 3 attempts failed" → 3).
fn number_before(line: &str, needle: &str) -> u64 {
    let head = &line[..line
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in {line}"))];
    head.split_whitespace().last().unwrap().parse().unwrap()
}

/// The number after `needle` in `line` ("next try in 4s" → 4).
fn number_after(line: &str, needle: &str) -> u64 {
    let (_, tail) = line
        .split_once(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in {line}"));
    let digits: String = tail.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().unwrap()
}

/// Names learned while the state directory refuses writes are kept; the attempts back off
/// (a handful in twelve seconds, not twelve), the log says so once per attempt, and the
/// first attempt after the directory takes writes again writes everything: the normal pace
/// resumes, and a restart after `kill -9` (no final save) restores every name.
#[test]
fn writes_back_off_while_the_state_directory_refuses_them_and_all_is_written_after() {
    let Some(bed) = Bed::new("127.0.0.161") else {
        return;
    };
    let state = bed.state();
    let journal = state.join("fqdn-cache.journal");
    let mut a = bed.start();
    check_immutable_refuses_open_writers(&state);
    bed.first_batch(&a);
    assert_eq!(metric(&a, "fqdnwall_state_write_failures_total"), 0.0);
    assert_eq!(metric(&a, "fqdnwall_state_write_failing"), 0.0);

    let outage = Immutable::set(&[journal.clone(), state.clone()]);
    learn(&a, "early.example.test");
    let first = a.wait_log("cannot append learned names to", Duration::from_secs(5));
    let since = Instant::now();
    assert!(
        first.contains(&journal.display().to_string())
            && first.contains("Operation not permitted")
            && first.contains("next try in 1s"),
        "the first failure names the file, the error and the next try: {first}"
    );
    std::thread::sleep(Duration::from_secs(5));
    learn(&a, "late.example.test");
    assert!(allowed(&a, "192.0.2.22"), "learning goes on meanwhile");
    std::thread::sleep(Duration::from_secs(12).saturating_sub(since.elapsed()));

    // Twelve seconds of failing writes: the append fails, then each retry (a snapshot
    // started after a wait of 1, 2, 4 s, found failed a round later) — failures at about
    // 0, 2, 5 and 10 s, the next at 19 s; not one or more every second.
    let failures = metric(&a, "fqdnwall_state_write_failures_total");
    assert!(
        (3.0..=5.0).contains(&failures),
        "{failures} failed attempts in 12 s"
    );
    assert_eq!(metric(&a, "fqdnwall_state_write_failing"), 1.0);
    // One error line per failed attempt, each saying how many failed and the next wait.
    a.wait_log(
        &format!("{} attempts failed", failures as u64),
        Duration::from_secs(1),
    );
    let lines: Vec<&String> = a
        .stderr_seen
        .iter()
        .filter(|l| l.contains("ERROR"))
        .collect();
    assert_eq!(lines.len() as f64, failures, "{lines:#?}");
    for (i, l) in lines.iter().enumerate().skip(1) {
        assert_eq!(number_before(l, "attempts failed"), i as u64 + 1, "{l}");
        assert_eq!(number_after(l, "next try in "), 1 << i, "{l}");
    }

    drop(outage);
    let back = a.wait_log("persistence recovered after", Duration::from_secs(20));
    let failed = number_before(&back, "failed attempts");
    assert_eq!(
        failed as f64,
        metric(&a, "fqdnwall_state_write_failures_total")
    );
    assert_eq!(metric(&a, "fqdnwall_state_write_failing"), 0.0);
    let snapshot = std::fs::read_to_string(state.join("fqdn-cache.json")).unwrap();
    for name in ["www", "early", "late"] {
        assert!(
            snapshot.contains(&format!("\"{name}.example.test.\"")),
            "{name} in the new snapshot: {snapshot}"
        );
    }
    // Back to the journal once a second.
    let before = bed.journal_len();
    learn(&a, "after.example.test");
    eventually(Duration::from_secs(3), "a journaled batch", || {
        (bed.journal_len() > before).then_some(())
    });
    assert!(!a.stop_with("KILL").success());

    let a = bed.start();
    for ip in ["192.0.2.10", "192.0.2.21", "192.0.2.22", "192.0.2.23"] {
        assert!(allowed(&a, ip), "{ip} restored");
    }
    assert_eq!(
        learned_names(&a),
        [
            "after.example.test.",
            "early.example.test.",
            "late.example.test.",
            "www.example.test."
        ]
    );
    assert_eq!(a.stop().code(), Some(0));
}

/// A clean stop while the save loop waits out its backoff still writes: the directory takes
/// writes again, the agent stops before the loop's next attempt, and what was learned
/// during the outage (changes the loop could not write and dropped for the next snapshot)
/// is in the snapshot the stop writes.
#[test]
fn a_clean_stop_during_the_backoff_writes_everything_learned() {
    let Some(bed) = Bed::new("127.0.0.162") else {
        return;
    };
    let state = bed.state();
    let journal = state.join("fqdn-cache.journal");
    let mut a = bed.start();
    check_immutable_refuses_open_writers(&state);
    bed.first_batch(&a);

    let outage = Immutable::set(&[journal.clone(), state.clone()]);
    learn(&a, "early.example.test");
    a.wait_log("cannot append learned names to", Duration::from_secs(5));
    // The third failed attempt: the next is four seconds away.
    let line = a.wait_log("3 attempts failed", Duration::from_secs(10));
    assert_eq!(number_after(&line, "next try in "), 4, "{line}");
    learn(&a, "late.example.test");
    drop(outage);
    assert_eq!(a.stop().code(), Some(0));

    let a = bed.start();
    for ip in ["192.0.2.10", "192.0.2.21", "192.0.2.22"] {
        assert!(allowed(&a, ip), "{ip} restored");
    }
    assert_eq!(
        learned_names(&a),
        [
            "early.example.test.",
            "late.example.test.",
            "www.example.test."
        ]
    );
    assert_eq!(a.stop().code(), Some(0));
}

/// A state directory removed under the running agent: the journal it keeps open would take
/// writes that no restart reads, so appending counts as a failure; once the directory is
/// back, the next attempt writes everything learned, and the identities file too.
#[test]
fn a_state_directory_removed_while_running_is_written_again_once_it_is_back() {
    let Some(bed) = Bed::new("127.0.0.164") else {
        return;
    };
    let state = bed.state();
    let mut a = bed.start();
    learn(&a, "www.example.test");
    eventually(Duration::from_secs(5), "the first batch", || {
        (bed.journal_len() > 8 && state.join("identities.json").exists()).then_some(())
    });

    std::fs::remove_dir_all(&state).unwrap();
    learn(&a, "early.example.test");
    let first = a.wait_log("removed or replaced while open", Duration::from_secs(5));
    assert!(
        first.contains(&state.join("fqdn-cache.journal").display().to_string()),
        "{first}"
    );
    let second = a.wait_log("2 attempts failed", Duration::from_secs(5));
    assert!(second.contains("No such file or directory"), "{second}");
    assert_eq!(metric(&a, "fqdnwall_state_write_failing"), 1.0);

    std::fs::create_dir(&state).unwrap();
    a.wait_log(
        "persistence recovered after 2 failed attempts",
        Duration::from_secs(10),
    );
    assert_eq!(metric(&a, "fqdnwall_state_write_failing"), 0.0);
    assert_eq!(metric(&a, "fqdnwall_state_write_failures_total"), 2.0);
    assert!(state.join("identities.json").exists());
    assert!(!a.stop_with("KILL").success());

    let a = bed.start();
    for ip in ["192.0.2.10", "192.0.2.21"] {
        assert!(allowed(&a, ip), "{ip} restored");
    }
    assert_eq!(a.stop().code(), Some(0));
}

/// A state directory that takes no new files (here `chattr +i` on it alone) while the
/// journal it holds still takes appends, as with exhausted inodes or a directory made
/// read-only: the snapshot and the identities file cannot be written and their attempts back
/// off, but the journal goes on taking the changes once a second, so a `kill -9` during the
/// backoff loses no more than a second of them.
#[test]
fn names_learned_while_only_new_files_are_refused_are_journaled_and_survive_kill_9() {
    let Some(bed) = Bed::new("127.0.0.165") else {
        return;
    };
    let state = bed.state();
    let a = bed.start();
    bed.first_batch(&a);
    // Killed with a batch in the journal: the next start folds it into a new snapshot at
    // once, which the immutable directory refuses.
    assert!(!a.stop_with("KILL").success());

    let outage = Immutable::set(std::slice::from_ref(&state));
    let mut a = bed.start();
    // Identities, then the snapshot, then the snapshot again: the next attempt is 4 s away.
    let line = a.wait_log("3 attempts failed", Duration::from_secs(15));
    assert_eq!(number_after(&line, "next try in "), 4, "{line}");
    assert_eq!(metric(&a, "fqdnwall_state_write_failing"), 1.0);
    let before = bed.journal_len();
    learn(&a, "late.example.test");
    // Within the wait: the journal takes the batch at the usual pace.
    eventually(
        Duration::from_secs(3),
        "a batch journaled during the backoff",
        || (bed.journal_len() > before).then_some(()),
    );
    assert!(!a.stop_with("KILL").success());
    drop(outage);

    let a = bed.start();
    for ip in ["192.0.2.10", "192.0.2.22"] {
        assert!(allowed(&a, ip), "{ip} restored");
    }
    assert_eq!(
        learned_names(&a),
        ["late.example.test.", "www.example.test."]
    );
    assert_eq!(a.stop().code(), Some(0));
}

/// A clean stop while only new files are refused: the stop's snapshot cannot be written
/// either, and the last changes (learned since the save loop's last round) go to the
/// journal, which still takes them.
#[test]
fn a_clean_stop_while_only_new_files_are_refused_journals_the_last_changes() {
    let Some(bed) = Bed::new("127.0.0.166") else {
        return;
    };
    let state = bed.state();
    let a = bed.start();
    bed.first_batch(&a);
    assert!(!a.stop_with("KILL").success());

    let outage = Immutable::set(std::slice::from_ref(&state));
    let mut a = bed.start();
    a.wait_log("2 attempts failed", Duration::from_secs(10));
    learn(&a, "late.example.test");
    assert_eq!(a.stop().code(), Some(0));
    drop(outage);

    let a = bed.start();
    assert!(allowed(&a, "192.0.2.22"), "192.0.2.22 restored");
    assert_eq!(
        learned_names(&a),
        ["late.example.test.", "www.example.test."]
    );
    assert_eq!(a.stop().code(), Some(0));
}

/// A journal that cannot be replaced (immutable, here) while the directory takes a new
/// snapshot: a name cleaned before the outage and learned again during it is in the new
/// snapshot, and the old journal, which the new snapshot replaced, must not be replayed over
/// it (its removal record would undo the name). The same files are left by a crash between
/// a compaction's two replacements.
#[test]
fn an_old_journal_is_not_replayed_over_the_snapshot_that_replaced_it() {
    let Some(bed) = Bed::new("127.0.0.167") else {
        return;
    };
    let state = bed.state();
    let journal = state.join("fqdn-cache.journal");
    let mut a = bed.start();
    check_immutable_refuses_open_writers(&state);
    bed.first_batch(&a);
    let done = a.json(&[
        "fqdn",
        "cache",
        "clean",
        "--endpoint",
        "frontend",
        "--name",
        "www.example.test",
    ]);
    assert_eq!(done["removed"], 1);
    let before = bed.journal_len();
    eventually(Duration::from_secs(5), "the removal journaled", || {
        (bed.journal_len() > before).then_some(())
    });

    let outage = Immutable::set(std::slice::from_ref(&journal));
    learn(&a, "www.example.test");
    a.wait_log("cannot append learned names to", Duration::from_secs(5));
    // The next attempt writes a new snapshot (the directory takes it), then cannot replace
    // the journal.
    let line = a.wait_log("2 attempts failed", Duration::from_secs(10));
    assert!(line.contains("start a new journal"), "{line}");
    let snapshot = std::fs::read_to_string(state.join("fqdn-cache.json")).unwrap();
    assert!(snapshot.contains("\"www.example.test.\""), "{snapshot}");
    assert!(!a.stop_with("KILL").success());
    drop(outage);

    let a = bed.start();
    assert!(allowed(&a, "192.0.2.10"), "www learned again is restored");
    assert_eq!(learned_names(&a), ["www.example.test."]);
    assert_eq!(a.stop().code(), Some(0));
}
