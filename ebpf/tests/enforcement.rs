//! Kernel tests: real programs on veths between network namespaces, maps programmed
//! through the datapath API. Root only (skipped otherwise, failing under CI=true).

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use common::*;
use ebpf::{EndpointFlags, EntryValue, EventKind, LoadOptions, Reason};
use policy::mapstate::{port_range_keys, MapKey};
use policy::model::Direction;

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

fn key(identity: u32, direction: Direction, protocol: u8, port: u16, prefix_len: u8) -> MapKey {
    MapKey {
        identity,
        direction,
        protocol,
        port,
        prefix_len,
    }
}

fn allow() -> EntryValue {
    EntryValue {
        deny: false,
        proxy_port: 0,
    }
}

fn deny() -> EntryValue {
    EntryValue {
        deny: true,
        proxy_port: 0,
    }
}

fn egress(identity: u32, protocol: u8, port: u16, prefix_len: u8) -> MapKey {
    key(identity, Direction::Egress, protocol, port, prefix_len)
}

const WORLD_ID: u32 = 16_777_217;

fn bed(clients: usize) -> Option<Bed> {
    if !privileged() {
        return None;
    }
    Some(Bed::new(clients, LoadOptions::default()))
}

#[test]
fn default_deny_then_identity_and_port_allow() {
    let Some(b) = bed(1) else { return };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _g = rt.enter();
    let mut events = b.dp().events().unwrap();
    let _srv = Servers::start(&b.world, &[8080, 9090]);
    b.attach(1, 7, 300, ENFORCE);
    b.dp()
        .upsert_ipcache(net(&format!("{}/32", b.world_v4)), WORLD_ID)
        .unwrap();
    let c = &b.client(1).ns;

    // Enforced, no entries: nothing goes out.
    assert!(tcp(c, sa(b.world_v4, 8080), SHORT).is_err());
    let ev = events.drain();
    assert!(
        ev.iter().any(|e| e.kind == EventKind::Drop
            && e.reason == Reason::PolicyDefaultDeny
            && e.endpoint == 7
            && e.remote_identity == WORLD_ID
            && e.dst_port == 8080
            && e.dst == IpAddr::V4(b.world_v4)),
        "no default-deny drop event in {ev:?}"
    );

    // Allow TCP 8080 to the world identity: the connection and its replies pass (the
    // ingress direction is enforced too and has no entries: conntrack lets replies in).
    b.dp()
        .apply_policy_diff(7, &[(egress(WORLD_ID, TCP, 8080, 16), allow())], &[])
        .unwrap();
    assert_eq!(
        tcp(c, sa(b.world_v4, 8080), SHORT).as_deref(),
        Ok("echo:hi")
    );
    assert!(
        tcp(c, sa(b.world_v4, 9090), SHORT).is_err(),
        "other port must stay closed"
    );
    assert!(
        udp(c, sa(b.world_v4, 8080), SHORT).is_err(),
        "UDP was not allowed"
    );
    assert!(!ping(c, b.world_v4.into(), SHORT), "ICMP was not allowed");

    // Counters of the entry.
    let rows = b.dp().policy_entries(7).unwrap();
    assert_eq!(rows.len(), 1);
    assert!(rows[0].packets >= 3, "counted {rows:?}");
    assert!(rows[0].bytes > 100);

    // Another identity for the same IP: the entry no longer applies.
    b.dp()
        .upsert_ipcache(net(&format!("{}/32", b.world_v4)), WORLD_ID + 1)
        .unwrap();
    assert!(tcp(c, sa(b.world_v4, 8080), SHORT).is_err());

    // Any-identity entry for UDP 9090.
    b.dp()
        .apply_policy_diff(7, &[(egress(0, UDP, 9090, 16), allow())], &[])
        .unwrap();
    assert_eq!(
        udp(c, sa(b.world_v4, 9090), SHORT).as_deref(),
        Ok("echo:hi")
    );
    let st = b.dp().status().unwrap();
    let get = |n: &str| st.counters.iter().find(|(k, _)| *k == n).unwrap().1;
    assert!(get("drop_policy") >= 4, "{st:?}");
    assert!(get("allowed_new") >= 2);
    assert!(get("replies") >= 2);
}

#[test]
fn cidr_except_and_lpm_fallback() {
    let Some(b) = bed(1) else { return };
    let _srv = Servers::start(&b.world, &[8080]);
    // A second world address, covered only by the /24.
    let other = Ipv4Addr::new(10, b.n as u8, 200, 3);
    b.world
        .ip(&["addr", "add", &format!("{other}/24"), "dev", "eth0"]);
    b.attach(1, 3, 300, ENFORCE);
    // toCIDRSet 10.n.200.0/24 except 10.n.200.2/32: the /24 maps to the CIDR identity, the
    // excepted /32 to an identity the policy does not select.
    b.dp().upsert_ipcache(b.world_net4(), 20_000).unwrap();
    b.dp()
        .upsert_ipcache(net(&format!("{}/32", b.world_v4)), 20_001)
        .unwrap();
    b.dp()
        .apply_policy_diff(3, &[(egress(20_000, 0, 0, 0), allow())], &[])
        .unwrap();
    let c = &b.client(1).ns;
    assert_eq!(tcp(c, sa(other, 8080), SHORT).as_deref(), Ok("echo:hi"));
    assert!(
        tcp(c, sa(b.world_v4, 8080), SHORT).is_err(),
        "excepted address must be denied"
    );
    // Deleting the /32 makes the address fall back to the /24 (LPM).
    b.dp()
        .delete_ipcache(net(&format!("{}/32", b.world_v4)))
        .unwrap();
    assert_eq!(
        tcp(c, sa(b.world_v4, 8080), SHORT).as_deref(),
        Ok("echo:hi")
    );
    let list = b.dp().ipcache_entries().unwrap();
    assert_eq!(list, vec![(b.world_net4(), 20_000)]);
}

#[test]
fn port_ranges_icmp_and_deny_precedence() {
    let Some(b) = bed(1) else { return };
    let _srv = Servers::start(&b.world, &[8080, 8190, 8300]);
    b.attach(1, 4, 300, ENFORCE);
    b.dp()
        .upsert_ipcache(net(&format!("{}/32", b.world_v4)), WORLD_ID)
        .unwrap();
    // TCP 8000-8191 as prefix-aligned keys, ICMP echo.
    let mut adds: Vec<(MapKey, EntryValue)> = port_range_keys(8000, 8191)
        .into_iter()
        .map(|(p, l)| (egress(WORLD_ID, TCP, p, l), allow()))
        .collect();
    adds.push((egress(WORLD_ID, ICMP, 8, 16), allow()));
    b.dp().apply_policy_diff(4, &adds, &[]).unwrap();
    let c = &b.client(1).ns;
    assert_eq!(
        tcp(c, sa(b.world_v4, 8080), SHORT).as_deref(),
        Ok("echo:hi")
    );
    assert_eq!(
        tcp(c, sa(b.world_v4, 8190), SHORT).as_deref(),
        Ok("echo:hi")
    );
    assert!(tcp(c, sa(b.world_v4, 8300), SHORT).is_err());
    assert!(ping(c, b.world_v4.into(), SHORT));

    // A deny of identity 0 on one port wins over the specific identity's range allow.
    b.dp()
        .apply_policy_diff(4, &[(egress(0, TCP, 8190, 16), deny())], &[])
        .unwrap();
    assert!(
        tcp(c, sa(b.world_v4, 8190), SHORT).is_err(),
        "deny must win"
    );
    assert_eq!(
        tcp(c, sa(b.world_v4, 8080), SHORT).as_deref(),
        Ok("echo:hi")
    );
    // An L3 deny of the identity: the engine never keeps an allow of the same identity that
    // the deny covers, so the diff adds the deny and deletes those allows.
    let covered: Vec<MapKey> = adds.iter().map(|(k, _)| *k).collect();
    b.dp()
        .apply_policy_diff(4, &[(egress(WORLD_ID, 0, 0, 0), deny())], &covered)
        .unwrap();
    assert!(tcp(c, sa(b.world_v4, 8080), SHORT).is_err());
    assert!(!ping(c, b.world_v4.into(), SHORT));
    // Removing the deny restores the allows.
    b.dp()
        .apply_policy_diff(4, &adds, &[egress(WORLD_ID, 0, 0, 0)])
        .unwrap();
    assert_eq!(
        tcp(c, sa(b.world_v4, 8080), SHORT).as_deref(),
        Ok("echo:hi")
    );
    assert!(ping(c, b.world_v4.into(), SHORT));
}

#[test]
fn ingress_policy_and_unenforced_direction() {
    let Some(b) = bed(1) else { return };
    let c = &b.client(1);
    let _srv = Servers::start(&c.ns, &[5000, 5001]);
    // Egress not enforced: the endpoint reaches anything; ingress enforced.
    b.attach(
        1,
        5,
        300,
        EndpointFlags {
            audit: false,
            enforce_ingress: true,
            enforce_egress: false,
        },
    );
    b.dp()
        .upsert_ipcache(net(&format!("{}/32", b.world_v4)), WORLD_ID)
        .unwrap();
    let _wsrv = Servers::start(&b.world, &[8080]);
    assert_eq!(
        tcp(&c.ns, sa(b.world_v4, 8080), SHORT).as_deref(),
        Ok("echo:hi")
    );
    assert!(tcp(&b.world, sa(c.v4, 5000), SHORT).is_err());
    b.dp()
        .apply_policy_diff(
            5,
            &[(key(WORLD_ID, Direction::Ingress, TCP, 5000, 16), allow())],
            &[],
        )
        .unwrap();
    assert_eq!(
        tcp(&b.world, sa(c.v4, 5000), SHORT).as_deref(),
        Ok("echo:hi")
    );
    assert!(tcp(&b.world, sa(c.v4, 5001), SHORT).is_err());
    // An egress entry does not open ingress.
    b.dp()
        .apply_policy_diff(5, &[(egress(WORLD_ID, TCP, 5001, 16), allow())], &[])
        .unwrap();
    assert!(tcp(&b.world, sa(c.v4, 5001), SHORT).is_err());
}

#[test]
fn ipv6_and_icmpv6() {
    let Some(b) = bed(1) else { return };
    let _srv = Servers::start(&b.world, &[8080]);
    b.attach(1, 6, 300, ENFORCE);
    b.dp()
        .upsert_ipcache(net(&format!("{}/128", b.world_v6)), WORLD_ID)
        .unwrap();
    b.dp().upsert_ipcache(net("::/0"), 10).unwrap();
    let c = &b.client(1).ns;
    assert!(tcp(c, sa(b.world_v6, 8080), SHORT).is_err());
    assert!(!ping(c, b.world_v6.into(), SHORT));
    b.dp()
        .apply_policy_diff(
            6,
            &[
                (egress(WORLD_ID, TCP, 8080, 16), allow()),
                (egress(WORLD_ID, ICMPV6, 128, 16), allow()),
            ],
            &[],
        )
        .unwrap();
    assert_eq!(
        tcp(c, sa(b.world_v6, 8080), SHORT).as_deref(),
        Ok("echo:hi")
    );
    assert!(ping(c, b.world_v6.into(), SHORT));
    // The world-ipv6 fallback identity (from ::/0) is not allowed.
    let other = format!("fd00:{:x}:c8::3", b.n);
    b.world.ip(&[
        "addr",
        "add",
        &format!("{other}/64"),
        "dev",
        "eth0",
        "nodad",
    ]);
    let other: std::net::Ipv6Addr = other.parse().unwrap();
    assert!(tcp(c, sa(other, 8080), SHORT).is_err());
    b.dp()
        .apply_policy_diff(6, &[(egress(10, TCP, 0, 0), allow())], &[])
        .unwrap();
    assert_eq!(tcp(c, sa(other, 8080), SHORT).as_deref(), Ok("echo:hi"));
}

#[test]
fn audit_mode_passes_and_reports() {
    let Some(b) = bed(1) else { return };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _g = rt.enter();
    let mut events = b.dp().events().unwrap();
    let _srv = Servers::start(&b.world, &[8080]);
    b.attach(
        1,
        8,
        300,
        EndpointFlags {
            audit: true,
            enforce_ingress: true,
            enforce_egress: true,
        },
    );
    b.dp()
        .upsert_ipcache(net(&format!("{}/32", b.world_v4)), WORLD_ID)
        .unwrap();
    b.dp()
        .apply_policy_diff(8, &[(egress(WORLD_ID, TCP, 8080, 16), deny())], &[])
        .unwrap();
    let c = &b.client(1).ns;
    assert_eq!(
        tcp(c, sa(b.world_v4, 8080), SHORT).as_deref(),
        Ok("echo:hi")
    );
    assert!(ping(c, b.world_v4.into(), SHORT));
    let ev = events.drain();
    let audit: Vec<_> = ev.iter().filter(|e| e.kind == EventKind::Audit).collect();
    assert!(
        audit
            .iter()
            .any(|e| e.reason == Reason::PolicyDeny && e.dst_port == 8080 && e.matched.is_some()),
        "{ev:?}"
    );
    assert!(
        audit
            .iter()
            .any(|e| e.reason == Reason::PolicyDefaultDeny && e.protocol == ICMP),
        "{ev:?}"
    );
    assert!(!ev.iter().any(|e| e.kind == EventKind::Drop), "{ev:?}");
    let conns = b.dp().connections().unwrap();
    assert!(conns.iter().any(|c| c.audit && c.endpoint == 8));
}

#[test]
fn first_syn_to_just_inserted_ip_succeeds() {
    let Some(b) = bed(1) else { return };
    let _srv = Servers::start(&b.world, &[8080]);
    b.attach(1, 9, 300, ENFORCE);
    b.dp().upsert_ipcache(net("0.0.0.0/0"), 9).unwrap();
    let fqdn_id = (1 << 24) | 77;
    // Policy first, then the ipcache entry (the ordering contract).
    b.dp()
        .apply_policy_diff(9, &[(egress(fqdn_id, TCP, 8080, 16), allow())], &[])
        .unwrap();
    let c = &b.client(1).ns;
    assert!(tcp(c, sa(b.world_v4, 8080), SHORT).is_err());
    for round in 0..3 {
        b.dp()
            .upsert_ipcache(net(&format!("{}/32", b.world_v4)), fqdn_id)
            .unwrap();
        // 900 ms: a dropped first SYN would need the 1 s retransmission.
        assert_eq!(
            tcp(c, sa(b.world_v4, 8080), SHORT).as_deref(),
            Ok("echo:hi"),
            "round {round}"
        );
        b.dp()
            .delete_ipcache(net(&format!("{}/32", b.world_v4)))
            .unwrap();
        assert!(tcp(c, sa(b.world_v4, 8080), Duration::from_millis(300)).is_err());
    }
}

#[test]
fn conntrack_keeps_open_connections_and_reports_them() {
    let Some(b) = bed(1) else { return };
    let _srv = Servers::start(&b.world, &[8080]);
    b.attach(1, 10, 300, ENFORCE);
    let ip = net(&format!("{}/32", b.world_v4));
    b.dp().upsert_ipcache(ip, WORLD_ID).unwrap();
    b.dp()
        .apply_policy_diff(10, &[(egress(WORLD_ID, TCP, 8080, 16), allow())], &[])
        .unwrap();
    let c = &b.client(1).ns;
    let conn = OpenConn::open(c, sa(b.world_v4, 8080)).unwrap();
    assert_eq!(conn.exchange("a").as_deref(), Ok("echo:a"));
    assert!(b.dp().is_connection_alive(10, IpAddr::V4(b.world_v4)));
    assert!(!b.dp().is_connection_alive(11, IpAddr::V4(b.world_v4)));
    let conns = b.dp().connections().unwrap();
    let me = conns
        .iter()
        .find(|c| c.endpoint == 10 && c.remote == IpAddr::V4(b.world_v4))
        .expect("tracked");
    assert_eq!(me.dst_port, 8080);
    assert!(me.replied);
    assert_eq!(me.remote_identity, WORLD_ID);
    // The IP's allow goes (an FQDN entry expiring): the open connection keeps working,
    // new ones are refused.
    b.dp().delete_ipcache(ip).unwrap();
    assert_eq!(conn.exchange("b").as_deref(), Ok("echo:b"));
    assert!(tcp(c, sa(b.world_v4, 8080), SHORT).is_err());
    drop(conn);
    // Closed: FIN both ways (give the close a moment to cross).
    std::thread::sleep(Duration::from_millis(100));
    assert!(!b.dp().is_connection_alive(10, IpAddr::V4(b.world_v4)));
}

#[test]
fn pinned_state_survives_the_loader_and_is_adopted() {
    let Some(mut b) = bed(1) else { return };
    let _srv = Servers::start(&b.world, &[8080, 9090]);
    b.attach(1, 12, 300, ENFORCE);
    b.dp()
        .upsert_ipcache(net(&format!("{}/32", b.world_v4)), WORLD_ID)
        .unwrap();
    b.dp()
        .apply_policy_diff(12, &[(egress(WORLD_ID, TCP, 8080, 16), allow())], &[])
        .unwrap();
    assert!(!b.dp().adopted());
    // The agent goes away (as with kill -9: nothing is cleaned up).
    b.dp = None;
    let c = &b.client(1).ns;
    assert_eq!(
        tcp(c, sa(b.world_v4, 8080), SHORT).as_deref(),
        Ok("echo:hi")
    );
    assert!(
        tcp(c, sa(b.world_v4, 9090), SHORT).is_err(),
        "still enforcing"
    );
    // A new loader adopts maps and links (in the router namespace, where the interface is).
    let pin = b.pins.0.clone();
    let dp = b
        .router
        .run(move || {
            ebpf::BpfDatapath::load_or_adopt(&LoadOptions {
                pin_dir: pin,
                ..LoadOptions::default()
            })
        })
        .unwrap();
    assert!(dp.adopted());
    let st = dp.status().unwrap();
    assert_eq!(st.attachments.len(), 1);
    assert_eq!(st.attachments[0].endpoint.id, 12);
    assert_eq!(st.attachments[0].ifname, "hc1");
    let rows = dp.policy_entries(12).unwrap();
    assert_eq!(rows.len(), 1);
    assert!(rows[0].packets > 0, "counters survive: {rows:?}");
    // The links still run the previous loader's programs; attaching again swaps in this
    // loader's programs atomically (an upgraded agent runs its own code).
    let mine: Vec<u32> = dp.programs().unwrap().iter().map(|p| p.1).collect();
    let before = st.attachments[0].program_ids;
    assert!(
        before[0] != 0 && !mine.contains(&before[0]),
        "{before:?} {mine:?}"
    );
    let dpr: &'static ebpf::BpfDatapath = unsafe_static(&dp);
    let ifindex = b.client(1).ifindex;
    b.router.run(move || {
        dpr.attach(
            ifindex,
            ebpf::AttachKind::Endpoint,
            ebpf::EndpointSpec {
                id: 12,
                identity: 300,
                flags: ENFORCE,
            },
        )
        .unwrap()
    });
    let after = dp.status().unwrap().attachments[0].program_ids;
    assert_eq!(after, [mine[0], mine[1]]);
    assert!(
        tcp(c, sa(b.world_v4, 9090), SHORT).is_err(),
        "still enforcing"
    );
    // The adopted loader reconciles with the newly computed state: only differences are
    // written (9090 added, 8080 gone; the ipcache entry unchanged).
    let (added, deleted) = dp
        .reconcile_policy(12, &[(egress(WORLD_ID, TCP, 9090, 16), allow())])
        .unwrap();
    assert_eq!((added, deleted), (1, 1));
    let world32 = net(&format!("{}/32", b.world_v4));
    assert_eq!(
        dp.reconcile_ipcache(&[(world32, WORLD_ID)]).unwrap(),
        (0, 0)
    );
    assert_eq!(
        tcp(c, sa(b.world_v4, 9090), SHORT).as_deref(),
        Ok("echo:hi")
    );
    assert!(tcp(c, sa(b.world_v4, 8080), SHORT).is_err());
    assert_eq!(
        dp.reconcile_policy(12, &[(egress(WORLD_ID, TCP, 9090, 16), allow())])
            .unwrap(),
        (0, 0)
    );
    // Unload removes programs and pins: traffic flows unfiltered.
    dp.unload().unwrap();
    assert!(!b.pins.0.join("maps").exists());
    assert_eq!(
        tcp(c, sa(b.world_v4, 8080), SHORT).as_deref(),
        Ok("echo:hi")
    );
}

#[test]
fn full_policy_map_is_an_error_and_counted() {
    if !privileged() {
        return;
    }
    let mut opts = LoadOptions::default();
    opts.capacities.policy = 4;
    let b = Bed::new(1, opts);
    let adds: Vec<(MapKey, EntryValue)> = (0..6)
        .map(|i| (egress(WORLD_ID, TCP, 1000 + i, 16), allow()))
        .collect();
    let err = b.dp().apply_policy_diff(1, &adds, &[]).unwrap_err();
    assert!(matches!(err, ebpf::Error::MapFull { .. }), "{err}");
    assert_eq!(b.dp().policy_len(), 4);
    assert!(b.dp().status().unwrap().map_full_errors >= 1);
}

#[test]
fn host_firewall_on_a_host_interface() {
    let Some(b) = bed(1) else { return };
    // The router's world-facing interface is the "host interface"; the router is the host.
    let dp: &'static ebpf::BpfDatapath = unsafe_static(b.dp());
    b.router.run(move || {
        dp.attach_host(
            "hw",
            ebpf::EndpointSpec {
                id: 1000,
                identity: 1,
                flags: EndpointFlags {
                    audit: false,
                    enforce_ingress: true,
                    enforce_egress: false,
                },
            },
        )
        .unwrap()
    });
    b.dp()
        .upsert_ipcache(net(&format!("{}/32", b.world_v4)), WORLD_ID)
        .unwrap();
    let router_v4 = Ipv4Addr::new(10, b.n as u8, 200, 1);
    let _srv = Servers::start(&b.router, &[7000]);
    assert!(!ping(&b.world, router_v4.into(), SHORT));
    assert!(tcp(&b.world, sa(router_v4, 7000), SHORT).is_err());
    b.dp()
        .apply_policy_diff(
            1000,
            &[
                (key(WORLD_ID, Direction::Ingress, ICMP, 8, 16), allow()),
                (key(WORLD_ID, Direction::Ingress, TCP, 7000, 16), allow()),
            ],
            &[],
        )
        .unwrap();
    assert!(ping(&b.world, router_v4.into(), SHORT));
    assert_eq!(
        tcp(&b.world, sa(router_v4, 7000), SHORT).as_deref(),
        Ok("echo:hi")
    );
    // The host's own egress is not enforced: it reaches the world.
    let _wsrv = Servers::start(&b.world, &[8080]);
    assert_eq!(
        tcp(&b.router, sa(b.world_v4, 8080), SHORT).as_deref(),
        Ok("echo:hi")
    );
    let st = b.dp().status().unwrap();
    assert!(st
        .attachments
        .iter()
        .any(|a| a.kind == ebpf::AttachKind::Host && a.ifname == "hw"));
}

#[test]
fn related_icmp_errors_reach_the_endpoint() {
    let Some(b) = bed(1) else { return };
    b.attach(1, 13, 300, ENFORCE);
    b.dp()
        .upsert_ipcache(net(&format!("{}/32", b.world_v4)), WORLD_ID)
        .unwrap();
    b.dp()
        .apply_policy_diff(13, &[(egress(WORLD_ID, UDP, 7777, 16), allow())], &[])
        .unwrap();
    // No server on 7777: the world answers "port unreachable", an ICMP error about our
    // flow; ingress is enforced with no entries, so only conntrack can let it in.
    let to = sa(b.world_v4, 7777);
    let err = b.client(1).ns.run(move || {
        let u = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        u.connect(to).unwrap();
        u.set_read_timeout(Some(SHORT)).unwrap();
        u.send(b"x").unwrap();
        let mut buf = [0u8; 16];
        u.recv(&mut buf).unwrap_err().kind()
    });
    assert_eq!(err, std::io::ErrorKind::ConnectionRefused);
    let counters = b.dp().counters().unwrap();
    assert!(counters
        .iter()
        .any(|(k, v)| *k == "related_icmp" && *v >= 1));
}

#[test]
fn policy_verdict_events_name_the_deciding_entry() {
    if !privileged() {
        return;
    }
    let b = Bed::new(
        1,
        LoadOptions {
            config: ebpf::DatapathConfig {
                verdict_events: true,
                ..Default::default()
            },
            ..LoadOptions::default()
        },
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _g = rt.enter();
    let mut events = b.dp().events().unwrap();
    let _srv = Servers::start(&b.world, &[8080]);
    b.attach(1, 14, 300, ENFORCE);
    b.dp()
        .upsert_ipcache(net(&format!("{}/32", b.world_v4)), WORLD_ID)
        .unwrap();
    let range = port_range_keys(8064, 8127);
    assert_eq!(range, vec![(8064, 10)]);
    b.dp()
        .apply_policy_diff(14, &[(egress(0, TCP, 8064, 10), allow())], &[])
        .unwrap();
    assert_eq!(
        tcp(&b.client(1).ns, sa(b.world_v4, 8080), SHORT).as_deref(),
        Ok("echo:hi")
    );
    // The async reader sees the same record.
    let batch = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(2), events.next_batch()).await })
        .expect("an event within 2 s")
        .unwrap();
    let v = batch
        .iter()
        .find(|e| e.kind == EventKind::PolicyVerdict)
        .expect("verdict event");
    assert_eq!(v.endpoint, 14);
    assert_eq!(v.direction, Direction::Egress);
    assert_eq!(v.remote_identity, WORLD_ID);
    assert_eq!(v.dst_port, 8080);
    assert_eq!(
        v.matched,
        Some(ebpf::MatchedEntry {
            identity: 0,
            protocol: TCP,
            port: 8064,
            prefix_len: 10
        })
    );
}

#[test]
fn fragmented_datagrams_pass_both_ways() {
    let Some(b) = bed(1) else { return };
    let _srv = Servers::start(&b.world, &[6000]);
    b.attach(1, 15, 300, ENFORCE);
    b.dp()
        .upsert_ipcache(net(&format!("{}/32", b.world_v4)), WORLD_ID)
        .unwrap();
    b.dp()
        .upsert_ipcache(net(&format!("{}/128", b.world_v6)), WORLD_ID)
        .unwrap();
    b.dp()
        .apply_policy_diff(15, &[(egress(WORLD_ID, UDP, 6000, 16), allow())], &[])
        .unwrap();
    let c = &b.client(1).ns;
    // 4000 bytes over a 1500-byte MTU: three fragments each way; the later ones carry no
    // ports and must be matched to their datagram.
    let r = udp_big(c, sa(b.world_v4, 6000), 4000, SHORT);
    assert_eq!(r, Ok(4005), "{:?}", b.dp().counters().unwrap());
    // The first IPv6 exchange of fresh namespaces may wait for neighbour discovery.
    let r = udp_big(c, sa(b.world_v6, 6000), 4000, Duration::from_secs(3));
    assert_eq!(r, Ok(4005), "{:?}", b.dp().counters().unwrap());
    // A port the policy does not allow: every fragment is dropped by policy (the later ones
    // get their datagram's ports from the first).
    let before = b.dp().counters().unwrap();
    assert!(udp_big(c, sa(b.world_v4, 6001), 4000, SHORT).is_err());
    let counters = b.dp().counters().unwrap();
    let get = |v: &[(&str, u64)], n: &str| v.iter().find(|(k, _)| *k == n).unwrap().1;
    assert!(
        get(&counters, "drop_policy") >= get(&before, "drop_policy") + 3,
        "{counters:?}"
    );
}

#[test]
fn global_audit_mode_is_switched_live() {
    let Some(b) = bed(1) else { return };
    let _srv = Servers::start(&b.world, &[8080]);
    b.attach(1, 16, 300, ENFORCE);
    b.dp()
        .upsert_ipcache(net(&format!("{}/32", b.world_v4)), WORLD_ID)
        .unwrap();
    let c = &b.client(1).ns;
    assert!(tcp(c, sa(b.world_v4, 8080), SHORT).is_err());
    b.dp()
        .set_config(&ebpf::DatapathConfig {
            audit: true,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        tcp(c, sa(b.world_v4, 8080), SHORT).as_deref(),
        Ok("echo:hi")
    );
    b.dp().set_config(&ebpf::DatapathConfig::default()).unwrap();
    assert!(tcp(c, sa(b.world_v4, 8080), SHORT).is_err());
}
