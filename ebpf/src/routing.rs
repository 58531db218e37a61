//! Policy routing that delivers proxy-steered packets locally.
//!
//! `bpf_sk_assign` hands a packet to a local socket, but the stack still routes it; for a
//! destination that is not a local address the packet would be forwarded. The programs mark
//! steered packets; a rule `fwmark MARK/MASK lookup TABLE` and `local` default routes via `lo`
//! in that table make the kernel deliver them to the assigned socket (the BPF TPROXY recipe).

use std::process::Command;

use crate::error::Error;

/// The rule and routes for one mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyRouting {
    pub mark: u32,
    pub mask: u32,
    pub table: u32,
    /// `ip rule` priority.
    pub priority: u32,
}

fn ip(args: &[&str]) -> Result<String, Error> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| Error::io("running ip (iproute2)", e))?;
    if !out.status.success() {
        return Err(Error::Command(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl ProxyRouting {
    fn mark_arg(&self) -> String {
        format!("{:#x}/{:#x}", self.mark, self.mask)
    }

    /// Installs the rules and routes for IPv4 and IPv6; installing twice changes nothing.
    pub fn install(&self) -> Result<(), Error> {
        let table = self.table.to_string();
        let prio = self.priority.to_string();
        let mark = self.mark_arg();
        for fam in ["-4", "-6"] {
            let rules = ip(&[fam, "rule", "show", "priority", &prio])?;
            if !rules.contains(&format!("lookup {table}")) {
                ip(&[
                    fam, "rule", "add", "priority", &prio, "fwmark", &mark, "lookup", &table,
                ])?;
            }
            let dst = if fam == "-4" { "0.0.0.0/0" } else { "::/0" };
            ip(&[
                fam, "route", "replace", "local", dst, "dev", "lo", "table", &table,
            ])?;
        }
        Ok(())
    }

    /// Removes what [`ProxyRouting::install`] added (missing pieces are not an error).
    pub fn remove(&self) -> Result<(), Error> {
        let table = self.table.to_string();
        let prio = self.priority.to_string();
        let mark = self.mark_arg();
        for fam in ["-4", "-6"] {
            let _ = ip(&[
                fam, "rule", "del", "priority", &prio, "fwmark", &mark, "lookup", &table,
            ]);
            let _ = ip(&[fam, "route", "flush", "table", &table]);
        }
        Ok(())
    }
}
