//! The socket options transparent operation relies on (root: CAP_NET_ADMIN).

use l7::net::{bind_listener, connect_marked, original_dst};
use socket2::SockRef;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[tokio::test]
async fn transparent_listener_marked_upstream_and_original_destination() {
    if !is_root() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI runs as root"
        );
        eprintln!("SKIP: needs root for IP_TRANSPARENT and SO_MARK");
        return;
    }
    let listener = bind_listener("127.0.0.1:0".parse().unwrap(), true).unwrap();
    assert!(SockRef::from(&listener).ip_transparent_v4().unwrap());
    let addr = listener.local_addr().unwrap();
    let (client, accepted) = tokio::join!(connect_marked(addr, Some(0x5a)), listener.accept());
    let client = client.unwrap();
    let (server_side, peer) = accepted.unwrap();
    assert_eq!(SockRef::from(&client).mark().unwrap(), 0x5a);
    assert_eq!(peer, client.local_addr().unwrap());
    // Without steering, the original destination is the listener itself.
    assert_eq!(original_dst(&server_side).unwrap(), addr);
    let unmarked = connect_marked(addr, None).await.unwrap();
    assert_eq!(SockRef::from(&unmarked).mark().unwrap(), 0);
}
