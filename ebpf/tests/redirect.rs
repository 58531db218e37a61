//! Kernel tests of proxy steering: flows whose entry has a proxy port, and endpoint DNS, go
//! to local transparent sockets (bpf_sk_assign + policy routing) that see the original
//! destination. Root only.

mod common;

use std::io::{Read, Write};
use std::mem::{size_of, zeroed};
use std::net::{
    Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, UdpSocket,
};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use ebpf::{DatapathConfig, EntryValue, LoadOptions, ProxyRouting};
use policy::mapstate::MapKey;
use policy::model::Direction;

const WORLD_ID: u32 = 16_777_300;
const MARK: u32 = 0x0200;
const MASK: u32 = 0x0f00;
const DNS_PORT: u16 = 10053;
const L7_PORT: u16 = 15001;

fn egress(identity: u32, protocol: u8, port: u16, proxy_port: u16) -> (MapKey, EntryValue) {
    (
        MapKey {
            identity,
            direction: Direction::Egress,
            protocol,
            port,
            prefix_len: 16,
        },
        EntryValue {
            deny: false,
            proxy_port,
        },
    )
}

fn setsockopt(fd: i32, level: i32, opt: i32) {
    let one: libc::c_int = 1;
    // SAFETY: an int option on a valid socket.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            &one as *const _ as *const libc::c_void,
            size_of::<libc::c_int>() as u32,
        )
    };
    assert_eq!(
        r,
        0,
        "setsockopt {opt}: {}",
        std::io::Error::last_os_error()
    );
}

/// An IPv4 socket with IP_TRANSPARENT (and SO_REUSEADDR) bound to `addr`.
fn transparent(kind: i32, addr: SocketAddrV4) -> i32 {
    // SAFETY: plain socket calls on a descriptor we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, kind, 0);
        assert!(fd >= 0);
        setsockopt(fd, libc::SOL_IP, libc::IP_TRANSPARENT);
        setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR);
        if kind == libc::SOCK_DGRAM {
            setsockopt(fd, libc::SOL_IP, libc::IP_RECVORIGDSTADDR);
        }
        let mut sin: libc::sockaddr_in = zeroed();
        sin.sin_family = libc::AF_INET as u16;
        sin.sin_port = addr.port().to_be();
        sin.sin_addr.s_addr = u32::from_ne_bytes(addr.ip().octets());
        let r = libc::bind(
            fd,
            &sin as *const _ as *const libc::sockaddr,
            size_of::<libc::sockaddr_in>() as u32,
        );
        assert_eq!(r, 0, "bind {addr}: {}", std::io::Error::last_os_error());
        fd
    }
}

/// An IPv6-only socket with IPV6_TRANSPARENT bound to `addr`.
fn transparent6(kind: i32, addr: SocketAddrV6) -> i32 {
    // SAFETY: plain socket calls on a descriptor we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, kind, 0);
        assert!(fd >= 0);
        setsockopt(fd, libc::SOL_IPV6, libc::IPV6_TRANSPARENT);
        setsockopt(fd, libc::SOL_IPV6, libc::IPV6_V6ONLY);
        setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR);
        if kind == libc::SOCK_DGRAM {
            setsockopt(fd, libc::SOL_IPV6, libc::IPV6_RECVORIGDSTADDR);
        }
        let mut sin: libc::sockaddr_in6 = zeroed();
        sin.sin6_family = libc::AF_INET6 as u16;
        sin.sin6_port = addr.port().to_be();
        sin.sin6_addr.s6_addr = addr.ip().octets();
        let r = libc::bind(
            fd,
            &sin as *const _ as *const libc::sockaddr,
            size_of::<libc::sockaddr_in6>() as u32,
        );
        assert_eq!(r, 0, "bind {addr}: {}", std::io::Error::last_os_error());
        fd
    }
}

/// Receives one IPv6 datagram with its original destination (IPV6_ORIGDSTADDR).
fn recv_orig6(fd: i32) -> Option<(SocketAddrV6, SocketAddrV6)> {
    // SAFETY: as recv_orig.
    unsafe {
        let mut buf = [0u8; 512];
        let mut from: libc::sockaddr_in6 = zeroed();
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        let mut cbuf = [0u8; 128];
        let mut msg: libc::msghdr = zeroed();
        msg.msg_name = &mut from as *mut _ as *mut libc::c_void;
        msg.msg_namelen = size_of::<libc::sockaddr_in6>() as u32;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = cbuf.len();
        if libc::recvmsg(fd, &mut msg, 0) < 0 {
            return None;
        }
        let mut cm = libc::CMSG_FIRSTHDR(&msg);
        while !cm.is_null() {
            if (*cm).cmsg_level == libc::SOL_IPV6 && (*cm).cmsg_type == libc::IPV6_ORIGDSTADDR {
                let d = &*(libc::CMSG_DATA(cm) as *const libc::sockaddr_in6);
                let orig = SocketAddrV6::new(
                    Ipv6Addr::from(d.sin6_addr.s6_addr),
                    u16::from_be(d.sin6_port),
                    0,
                    0,
                );
                let src = SocketAddrV6::new(
                    Ipv6Addr::from(from.sin6_addr.s6_addr),
                    u16::from_be(from.sin6_port),
                    0,
                    0,
                );
                return Some((src, orig));
            }
            cm = libc::CMSG_NXTHDR(&msg, cm);
        }
        None
    }
}

/// Receives one datagram with its original destination (IP_ORIGDSTADDR).
fn recv_orig(fd: i32) -> Option<(Vec<u8>, SocketAddrV4, SocketAddrV4)> {
    // SAFETY: recvmsg into buffers we own, control messages parsed within their bounds.
    unsafe {
        let mut buf = [0u8; 512];
        let mut from: libc::sockaddr_in = zeroed();
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        let mut cbuf = [0u8; 128];
        let mut msg: libc::msghdr = zeroed();
        msg.msg_name = &mut from as *mut _ as *mut libc::c_void;
        msg.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = cbuf.len();
        let n = libc::recvmsg(fd, &mut msg, 0);
        if n < 0 {
            return None;
        }
        let mut cm = libc::CMSG_FIRSTHDR(&msg);
        while !cm.is_null() {
            if (*cm).cmsg_level == libc::SOL_IP && (*cm).cmsg_type == libc::IP_ORIGDSTADDR {
                let d = &*(libc::CMSG_DATA(cm) as *const libc::sockaddr_in);
                let orig = SocketAddrV4::new(
                    Ipv4Addr::from(d.sin_addr.s_addr.to_ne_bytes()),
                    u16::from_be(d.sin_port),
                );
                let src = SocketAddrV4::new(
                    Ipv4Addr::from(from.sin_addr.s_addr.to_ne_bytes()),
                    u16::from_be(from.sin_port),
                );
                return Some((buf[..n as usize].to_vec(), src, orig));
            }
            cm = libc::CMSG_NXTHDR(&msg, cm);
        }
        None
    }
}

/// The proxies, running in the router namespace until dropped.
struct Proxies {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Proxies {
    fn start(router: &Netns) -> Proxies {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let st = stop.clone();
        // DNS proxy: answers "dns:<original destination>" from the original destination.
        threads.push(router.spawn(move || {
            let fd = transparent(
                libc::SOCK_DGRAM,
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, DNS_PORT),
            );
            // SAFETY: we own fd.
            let sock = unsafe { UdpSocket::from_raw_fd(fd) };
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            tx.send(()).unwrap();
            while !st.load(Ordering::Relaxed) {
                let Some((_data, src, orig)) = recv_orig(sock.as_raw_fd()) else {
                    continue;
                };
                let rfd = transparent(libc::SOCK_DGRAM, orig);
                // SAFETY: we own rfd.
                let reply = unsafe { UdpSocket::from_raw_fd(rfd) };
                let _ = reply.send_to(format!("dns:{orig}").as_bytes(), SocketAddr::V4(src));
            }
        }));
        rx.recv().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let st = stop.clone();
        // The same DNS proxy over IPv6.
        threads.push(router.spawn(move || {
            let fd = transparent6(
                libc::SOCK_DGRAM,
                SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, DNS_PORT, 0, 0),
            );
            // SAFETY: we own fd.
            let sock = unsafe { UdpSocket::from_raw_fd(fd) };
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            tx.send(()).unwrap();
            while !st.load(Ordering::Relaxed) {
                let Some((src, orig)) = recv_orig6(sock.as_raw_fd()) else {
                    continue;
                };
                let rfd = transparent6(libc::SOCK_DGRAM, orig);
                // SAFETY: we own rfd.
                let reply = unsafe { UdpSocket::from_raw_fd(rfd) };
                let _ = reply.send_to(format!("dns:{orig}").as_bytes(), SocketAddr::V6(src));
            }
        }));
        rx.recv().unwrap();
        // DNS over TCP: the listener on the DNS proxy port.
        let (tx, rx) = std::sync::mpsc::channel();
        let st = stop.clone();
        threads.push(router.spawn(move || {
            let fd = transparent(
                libc::SOCK_STREAM,
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, DNS_PORT),
            );
            // SAFETY: listen on our socket.
            assert_eq!(unsafe { libc::listen(fd, 16) }, 0);
            // SAFETY: we own fd.
            let l = unsafe { TcpListener::from_raw_fd(fd) };
            l.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            while !st.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        let orig = s.local_addr().unwrap();
                        let mut buf = [0u8; 64];
                        let _ = s.read(&mut buf);
                        let _ = s.write_all(format!("dnstcp:{orig}").as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }));
        rx.recv().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let st = stop.clone();
        // L7 proxy: answers "l7:<original destination>".
        threads.push(router.spawn(move || {
            let fd = transparent(
                libc::SOCK_STREAM,
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, L7_PORT),
            );
            // SAFETY: listen on our socket.
            assert_eq!(unsafe { libc::listen(fd, 16) }, 0);
            // SAFETY: we own fd.
            let l = unsafe { TcpListener::from_raw_fd(fd) };
            l.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            while !st.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        let orig = s.local_addr().unwrap();
                        let mut buf = [0u8; 64];
                        let _ = s.read(&mut buf);
                        let _ = s.write_all(format!("l7:{orig}").as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }));
        rx.recv().unwrap();
        Proxies { stop, threads }
    }
}

impl Drop for Proxies {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[test]
fn proxy_ports_and_dns_are_steered_to_local_sockets() {
    if !privileged() {
        return;
    }
    let b = Bed::new(
        1,
        LoadOptions {
            config: DatapathConfig {
                dns_proxy_port: DNS_PORT,
                proxy_mark: MARK,
                proxy_out_mark: 0x0300,
                proxy_mark_mask: MASK,
                audit: false,
                verdict_events: true,
            },
            ..LoadOptions::default()
        },
    );
    let routing = ProxyRouting {
        mark: MARK,
        mask: MASK,
        table: 2004,
        priority: 2004,
    };
    b.router.run(move || routing.install()).unwrap();
    // Installing twice is harmless.
    b.router.run(move || routing.install()).unwrap();
    let _proxies = Proxies::start(&b.router);
    let _srv = Servers::start(&b.world, &[8080, 9090, 53]);
    b.attach(1, 21, 300, ENFORCE);
    b.dp()
        .upsert_ipcache(net(&format!("{}/32", b.world_v4)), WORLD_ID)
        .unwrap();
    b.dp()
        .upsert_ipcache(net(&format!("{}/128", b.world_v6)), WORLD_ID)
        .unwrap();
    b.dp()
        .apply_policy_diff(
            21,
            &[
                egress(WORLD_ID, 17, 53, 0),
                egress(WORLD_ID, 6, 53, 0),
                egress(WORLD_ID, 6, 8080, L7_PORT),
                egress(WORLD_ID, 6, 9090, 15999),
            ],
            &[],
        )
        .unwrap();
    let c = &b.client(1).ns;

    // DNS to the world server is answered by the local proxy, which saw the original
    // destination (the real server would have echoed).
    assert_eq!(
        udp(c, sa(b.world_v4, 53), SHORT).as_deref(),
        Ok(format!("dns:{}:53", b.world_v4).as_str())
    );
    // Over TCP and over IPv6 as well.
    assert_eq!(
        tcp(c, sa(b.world_v4, 53), SHORT).as_deref(),
        Ok(format!("dnstcp:{}:53", b.world_v4).as_str())
    );
    assert_eq!(
        udp(c, sa(b.world_v6, 53), std::time::Duration::from_secs(3)).as_deref(),
        Ok(format!("dns:[{}]:53", b.world_v6).as_str())
    );
    // A flow whose entry carries a proxy port reaches the proxy, with its original
    // destination as the accepted socket's local address; the same packet path carries
    // the rest of the connection (replies come back through conntrack).
    assert_eq!(
        tcp(c, sa(b.world_v4, 8080), SHORT).as_deref(),
        Ok(format!("l7:{}:8080", b.world_v4).as_str())
    );
    // A proxy port without a socket: dropped, never let through to the server.
    assert!(tcp(c, sa(b.world_v4, 9090), SHORT).is_err());
    let counters = b.dp().counters().unwrap();
    let get = |n: &str| counters.iter().find(|(k, _)| *k == n).unwrap().1;
    assert!(get("redirected") >= 2, "{counters:?}");
    assert!(get("drop_proxy_unavailable") >= 1, "{counters:?}");
    let conns = b.dp().connections().unwrap();
    assert!(conns
        .iter()
        .any(|c| c.proxy_port == L7_PORT && c.dst_port == 8080));
    b.router.run(move || routing.remove()).unwrap();
}

#[test]
fn ingress_proxy_entries_fail_closed() {
    if !privileged() {
        return;
    }
    // Ingress steering is not available at the endpoint's tc egress hook: an ingress entry
    // that demands a proxy drops rather than let traffic bypass its L7 rules.
    let b = Bed::new(1, LoadOptions::default());
    let c = b.client(1);
    let _srv = Servers::start(&c.ns, &[5000, 5001]);
    b.attach(1, 22, 300, ENFORCE);
    b.dp()
        .upsert_ipcache(net(&format!("{}/32", b.world_v4)), WORLD_ID)
        .unwrap();
    let ingress = |port: u16, proxy_port: u16| {
        (
            MapKey {
                identity: WORLD_ID,
                direction: Direction::Ingress,
                protocol: 6,
                port,
                prefix_len: 16,
            },
            EntryValue {
                deny: false,
                proxy_port,
            },
        )
    };
    b.dp()
        .apply_policy_diff(22, &[ingress(5000, 0), ingress(5001, L7_PORT)], &[])
        .unwrap();
    assert_eq!(
        tcp(&b.world, sa(c.v4, 5000), SHORT).as_deref(),
        Ok("echo:hi")
    );
    assert!(tcp(&b.world, sa(c.v4, 5001), SHORT).is_err());
    let counters = b.dp().counters().unwrap();
    assert!(counters
        .iter()
        .any(|(k, v)| *k == "drop_proxy_unavailable" && *v >= 1));
}
