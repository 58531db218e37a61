//! Prometheus metrics in the text exposition format, served at `metrics.listen` `/metrics`.
//!
//! The agent's own counters live here; gauges (identities, endpoints, map entries, learned
//! names) are read from the state when scraped, and the DNS proxy's counters and histograms
//! are rendered from its own metrics, so nothing is counted twice.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Metrics {
    pub policy_reloads_ok: AtomicU64,
    pub policy_reloads_failed: AtomicU64,
    pub datapath_errors: AtomicU64,
    /// 1 while a `dns.cpuWakeLatency` bound is held (see `wake`), else 0.
    pub cpu_wake_engaged: AtomicU64,
    pub cpu_wake_engagements: AtomicU64,
    /// Attempts to write learned state to `stateDir` that failed (see `fqdn::save_loop`).
    pub state_write_failures: AtomicU64,
    /// 1 from a failed attempt to write learned state until an attempt writes all of it
    /// again, else 0. The clean stop reads it too: while it is 1 the files lack changes
    /// the save loop could not write, and only a new snapshot holds them.
    pub state_write_failing: AtomicU64,
}

/// Builds one exposition document.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A single unlabelled value with its header.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.header(name, kind, help);
        self.sample(name, &[], value);
    }

    /// A histogram from cumulative buckets `(upper bound or None for +Inf, count)`, as
    /// Prometheus wants them, plus sum and count.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        buckets: &[(Option<f64>, u64)],
        sum: f64,
        count: u64,
    ) {
        self.header(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        let mut saw_inf = false;
        for (le, n) in buckets {
            let le_s = match le {
                Some(x) => format!("{x}"),
                None => {
                    saw_inf = true;
                    "+Inf".to_string()
                }
            };
            self.sample(&bucket, &[("le", &le_s)], *n as f64);
        }
        if !saw_inf {
            self.sample(&bucket, &[("le", "+Inf")], count as f64);
        }
        self.sample(&format!("{name}_sum"), &[], sum);
        self.sample(&format!("{name}_count"), &[], count as f64);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

pub fn load(c: &AtomicU64) -> f64 {
    c.load(Ordering::Relaxed) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_format() {
        let mut e = Exposition::default();
        e.single("fw_x", "gauge", "An x.", 3.0);
        e.header("fw_q", "counter", "Queries.");
        e.sample("fw_q", &[("verdict", "allowed"), ("rcode", "NOERROR")], 2.0);
        e.histogram(
            "fw_h",
            "Hold.",
            &[(Some(0.001), 2), (Some(0.01), 3)],
            0.005,
            4,
        );
        let s = e.finish();
        assert!(s.contains("# TYPE fw_x gauge\nfw_x 3\n"));
        assert!(s.contains("fw_q{verdict=\"allowed\",rcode=\"NOERROR\"} 2\n"));
        assert!(s.contains("fw_h_bucket{le=\"0.01\"} 3\n"));
        assert!(s.contains("fw_h_bucket{le=\"+Inf\"} 4\n"));
        assert!(s.contains("fw_h_count 4\n"));
    }
}
