//! The least a UDP DNS forwarder can do: receive a query, give it an ID of its own, send it
//! upstream; receive the answer, put the client's ID back, send it to the client. Nothing is
//! parsed, judged or learned; one thread blocks on each of the two sockets.
//!
//! It is the floor of the latency comparison in `bench/dns/run.sh`: on a machine where waking
//! a blocked thread costs tens of microseconds (a virtual machine's idle CPUs halt), every
//! forwarder pays two such wake-ups per query, so what a forwarder adds over direct is this
//! relay's figure plus its own work. Not a product: no timeouts (an unanswered query's entry
//! stays until its ID comes round again), no TCP, one upstream.
//!
//! Usage: floor_relay LISTEN UPSTREAM   (e.g. floor_relay 127.0.0.1:25304 127.0.0.1:25300)

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::process::exit;
use std::sync::{Arc, Mutex, PoisonError};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream] = args.as_slice() else {
        eprintln!("usage: floor_relay LISTEN UPSTREAM");
        exit(2);
    };
    let parse = |what: &str, s: &str| -> SocketAddr {
        s.parse().unwrap_or_else(|e| {
            eprintln!("floor_relay: {what} {s:?}: {e}");
            exit(2)
        })
    };
    let (listen, upstream) = (parse("LISTEN", listen), parse("UPSTREAM", upstream));
    let bind = |addr: SocketAddr| {
        UdpSocket::bind(addr).unwrap_or_else(|e| {
            eprintln!("floor_relay: binding {addr}: {e}");
            exit(1)
        })
    };
    let clients = Arc::new(bind(listen));
    let any: SocketAddr = if upstream.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("literal address");
    let up = Arc::new(bind(any));
    if let Err(e) = up.connect(upstream) {
        eprintln!("floor_relay: connecting to {upstream}: {e}");
        exit(1);
    }
    // Our ID -> (the client's ID, the client).
    let pending: Arc<Mutex<HashMap<u16, (u16, SocketAddr)>>> = Arc::default();

    {
        let (clients, up, pending) = (clients.clone(), up.clone(), pending.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65535];
            loop {
                let Ok(n) = up.recv(&mut buf) else { continue };
                if n < 12 {
                    continue;
                }
                let id = u16::from_be_bytes([buf[0], buf[1]]);
                let entry = pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
                if let Some((client_id, client)) = entry {
                    buf[..2].copy_from_slice(&client_id.to_be_bytes());
                    let _ = clients.send_to(&buf[..n], client);
                }
            }
        });
    }

    let mut buf = vec![0u8; 65535];
    let mut next: u16 = 0;
    loop {
        let Ok((n, client)) = clients.recv_from(&mut buf) else {
            continue;
        };
        if n < 12 {
            continue;
        }
        next = next.wrapping_add(1);
        let client_id = u16::from_be_bytes([buf[0], buf[1]]);
        pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(next, (client_id, client));
        buf[..2].copy_from_slice(&next.to_be_bytes());
        let _ = up.send(&buf[..n]);
    }
}
