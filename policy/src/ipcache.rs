//! The ipcache: prefix → identity, as the datapath sees it.
//!
//! The datapath finds a packet's peer identity by longest-prefix match of the peer address.
//! Prefixes are kept normalised (host bits cleared). Lookups probe only the prefix lengths that
//! are present, so a table of a million /32s plus a few CIDRs costs a handful of hash probes.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::identity::NumericIdentity;

/// Prefix → identity with longest-prefix lookup for IPv4 and IPv6.
#[derive(Debug, Clone)]
pub struct Ipcache {
    v4: HashMap<(u32, u8), NumericIdentity>,
    v6: HashMap<(u128, u8), NumericIdentity>,
    /// Number of entries per prefix length (index = length).
    v4_lens: Vec<u32>,
    v6_lens: Vec<u32>,
}

/// What changed between two ipcaches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpcacheDiff {
    pub upserts: Vec<(IpNet, NumericIdentity)>,
    pub deletes: Vec<IpNet>,
}

fn v4_mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

fn v6_mask(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    }
}

impl Default for Ipcache {
    fn default() -> Self {
        Self::new()
    }
}

impl PartialEq for Ipcache {
    fn eq(&self, other: &Self) -> bool {
        self.v4 == other.v4 && self.v6 == other.v6
    }
}

impl Ipcache {
    pub fn new() -> Self {
        Ipcache {
            v4: HashMap::new(),
            v6: HashMap::new(),
            v4_lens: vec![0; 33],
            v6_lens: vec![0; 129],
        }
    }

    /// Sets the identity of a prefix (host bits are cleared). Returns the previous identity.
    pub fn upsert(&mut self, prefix: IpNet, identity: NumericIdentity) -> Option<NumericIdentity> {
        match prefix.trunc() {
            IpNet::V4(n) => {
                let k = (u32::from(n.addr()), n.prefix_len());
                let old = self.v4.insert(k, identity);
                if old.is_none() {
                    self.v4_lens[usize::from(k.1)] += 1;
                }
                old
            }
            IpNet::V6(n) => {
                let k = (u128::from(n.addr()), n.prefix_len());
                let old = self.v6.insert(k, identity);
                if old.is_none() {
                    self.v6_lens[usize::from(k.1)] += 1;
                }
                old
            }
        }
    }

    /// Removes a prefix. Returns its identity if it was present.
    pub fn remove(&mut self, prefix: &IpNet) -> Option<NumericIdentity> {
        match prefix.trunc() {
            IpNet::V4(n) => {
                let k = (u32::from(n.addr()), n.prefix_len());
                let old = self.v4.remove(&k);
                if old.is_some() {
                    self.v4_lens[usize::from(k.1)] -= 1;
                }
                old
            }
            IpNet::V6(n) => {
                let k = (u128::from(n.addr()), n.prefix_len());
                let old = self.v6.remove(&k);
                if old.is_some() {
                    self.v6_lens[usize::from(k.1)] -= 1;
                }
                old
            }
        }
    }

    /// The identity of exactly this prefix.
    pub fn get(&self, prefix: &IpNet) -> Option<NumericIdentity> {
        match prefix.trunc() {
            IpNet::V4(n) => self.v4.get(&(u32::from(n.addr()), n.prefix_len())).copied(),
            IpNet::V6(n) => self
                .v6
                .get(&(u128::from(n.addr()), n.prefix_len()))
                .copied(),
        }
    }

    /// Longest-prefix match: the most specific prefix containing `ip` and its identity.
    pub fn lookup(&self, ip: IpAddr) -> Option<(IpNet, NumericIdentity)> {
        match ip {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                for len in (0..=32u8).rev() {
                    if self.v4_lens[usize::from(len)] == 0 {
                        continue;
                    }
                    let net = a & v4_mask(len);
                    if let Some(&id) = self.v4.get(&(net, len)) {
                        let n = Ipv4Net::new(Ipv4Addr::from(net), len).expect("len <= 32");
                        return Some((IpNet::V4(n), id));
                    }
                }
                None
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                for len in (0..=128u8).rev() {
                    if self.v6_lens[usize::from(len)] == 0 {
                        continue;
                    }
                    let net = a & v6_mask(len);
                    if let Some(&id) = self.v6.get(&(net, len)) {
                        let n = Ipv6Net::new(Ipv6Addr::from(net), len).expect("len <= 128");
                        return Some((IpNet::V6(n), id));
                    }
                }
                None
            }
        }
    }

    /// The identity of `ip`: the longest-prefix match, or `reserved:world` when nothing
    /// matches (an address nobody described is outside the cluster).
    pub fn identity_of(&self, ip: IpAddr) -> NumericIdentity {
        self.lookup(ip)
            .map_or(crate::identity::reserved::WORLD, |(_, id)| id)
    }

    /// Every entry, ordered by prefix (IPv4 first).
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, NumericIdentity)> {
        let mut v: Vec<(IpNet, NumericIdentity)> = self
            .v4
            .iter()
            .map(|(&(a, l), &id)| {
                (
                    IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), l).expect("valid")),
                    id,
                )
            })
            .chain(self.v6.iter().map(|(&(a, l), &id)| {
                (
                    IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), l).expect("valid")),
                    id,
                )
            }))
            .collect();
        v.sort();
        v.into_iter()
    }

    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The changes that turn `self` into `newer`.
    pub fn diff(&self, newer: &Ipcache) -> IpcacheDiff {
        let mut d = IpcacheDiff::default();
        for (p, id) in newer.iter() {
            if self.get(&p) != Some(id) {
                d.upserts.push((p, id));
            }
        }
        for (p, _) in self.iter() {
            if newer.get(&p).is_none() {
                d.deletes.push(p);
            }
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let mut c = Ipcache::new();
        c.upsert(net("0.0.0.0/0"), 9);
        c.upsert(net("10.0.0.0/8"), 100);
        c.upsert(net("10.1.0.0/16"), 101);
        c.upsert(net("10.1.2.3/32"), 102);
        c.upsert(net("::/0"), 10);
        c.upsert(net("fd00::/8"), 200);
        c.upsert(net("fd00::1/128"), 201);
        assert_eq!(c.identity_of(ip("10.1.2.3")), 102);
        assert_eq!(c.identity_of(ip("10.1.2.4")), 101);
        assert_eq!(c.identity_of(ip("10.2.0.1")), 100);
        assert_eq!(c.identity_of(ip("8.8.8.8")), 9);
        assert_eq!(c.identity_of(ip("fd00::1")), 201);
        assert_eq!(c.identity_of(ip("fd00::2")), 200);
        assert_eq!(c.identity_of(ip("2001:db8::1")), 10);
        assert_eq!(c.lookup(ip("10.1.9.9")), Some((net("10.1.0.0/16"), 101)));
        // Host bits are cleared on insert.
        c.upsert(net("192.168.1.77/24"), 300);
        assert_eq!(c.get(&net("192.168.1.0/24")), Some(300));
        assert_eq!(c.remove(&net("10.1.0.0/16")), Some(101));
        assert_eq!(c.identity_of(ip("10.1.2.4")), 100);
        assert_eq!(c.remove(&net("10.1.0.0/16")), None);
        assert_eq!(c.len(), 7);
    }

    #[test]
    fn empty_cache_is_world() {
        let c = Ipcache::new();
        assert_eq!(
            c.identity_of(ip("1.2.3.4")),
            crate::identity::reserved::WORLD
        );
        assert!(c.lookup(ip("::1")).is_none());
    }

    #[test]
    fn iteration_and_diff() {
        let mut a = Ipcache::new();
        a.upsert(net("10.0.0.0/8"), 1);
        a.upsert(net("1.2.3.4/32"), 2);
        let mut b = a.clone();
        b.upsert(net("1.2.3.4/32"), 3);
        b.remove(&net("10.0.0.0/8"));
        b.upsert(net("fd00::/8"), 4);
        let d = a.diff(&b);
        assert_eq!(
            d.upserts,
            vec![(net("1.2.3.4/32"), 3), (net("fd00::/8"), 4)]
        );
        assert_eq!(d.deletes, vec![net("10.0.0.0/8")]);
        let all: Vec<_> = b.iter().collect();
        assert_eq!(all, vec![(net("1.2.3.4/32"), 3), (net("fd00::/8"), 4)]);
    }
}
