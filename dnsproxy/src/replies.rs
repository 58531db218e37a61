//! Replies to clients gathered while a UDP shard works through a batch of received datagrams
//! (client queries, upstream answers), sent together when the batch is done: one sendmmsg per
//! listener instead of a sendto per reply. A batch belongs to the thread that receives, so it
//! is a thread-local; outside a batch, replies go at once.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use tracing::debug;

use crate::net;

/// Replies to clients gathered while a shard works through a batch of received datagrams,
/// sent together (one sendmmsg per listener) when the batch is done.
#[derive(Default)]
struct ReplyBatch {
    open: bool,
    /// Listener, client and where the reply is in `bytes`.
    queued: Vec<(Arc<UdpSocket>, SocketAddr, Range<usize>)>,
    /// The replies' bytes, one after the other (copied in: a reply costs no allocation of
    /// its own; both vectors are kept between batches).
    bytes: Vec<u8>,
}

thread_local! {
    /// The batch of replies of the receiving thread.
    static REPLIES: std::cell::RefCell<ReplyBatch> = std::cell::RefCell::new(ReplyBatch::default());
}

/// Runs `f` with replies to clients gathered, then sends them. Nested calls join the outer
/// batch.
pub(crate) fn batch<R>(f: impl FnOnce() -> R) -> R {
    let _open = Open {
        outer: REPLIES.with(|r| std::mem::replace(&mut r.borrow_mut().open, true)),
    };
    f()
}

/// Closes the batch it opened and sends what was gathered, also when the work panicked (a
/// batch left open would keep every later reply of the thread).
struct Open {
    outer: bool,
}

impl Drop for Open {
    fn drop(&mut self) {
        if self.outer {
            return;
        }
        let (queued, bytes) = REPLIES.with(|r| {
            let mut r = r.borrow_mut();
            r.open = false;
            if r.queued.is_empty() {
                return (Vec::new(), Vec::new());
            }
            (std::mem::take(&mut r.queued), std::mem::take(&mut r.bytes))
        });
        if !queued.is_empty() {
            send_all(queued, bytes);
        }
    }
}

/// Sends gathered replies, one sendmmsg per run of replies on the same listener. A reply the
/// listener's buffer cannot take now waits for room (at most `net::SEND_WAIT`).
fn send_all(mut queued: Vec<(Arc<UdpSocket>, SocketAddr, Range<usize>)>, mut bytes: Vec<u8>) {
    let mut start = 0;
    while start < queued.len() {
        let listener = queued[start].0.clone();
        let run = queued[start..]
            .iter()
            .take_while(|(l, ..)| Arc::ptr_eq(l, &listener))
            .count();
        let mut from = start;
        let end = start + run;
        while from < end {
            let run = &queued[from..end];
            let (sent, err) = net::send_batch(listener.as_raw_fd(), run.len(), |i| {
                let (_, client, range) = &run[i];
                (Some(*client), &bytes[range.clone()])
            });
            from += sent;
            match err {
                None => {}
                Some(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The send buffer is full: this one waits for room (the listener is a
                    // blocking socket), then the rest go batched again.
                    let (_, client, range) = &queued[from];
                    if let Err(e) = listener.send_to(&bytes[range.clone()], *client) {
                        debug!(%client, error = %e, "UDP answer not sent");
                    }
                    from += 1;
                }
                Some(e) => {
                    debug!(client = %queued[from].1, error = %e, "UDP answer not sent");
                    from += 1;
                }
            }
        }
        start = end;
    }
    // Keep the allocations for the next batch.
    queued.clear();
    bytes.clear();
    REPLIES.with(|r| {
        let mut r = r.borrow_mut();
        if r.queued.capacity() < queued.capacity() && r.queued.is_empty() {
            r.queued = queued;
        }
        if r.bytes.capacity() < bytes.capacity() && r.bytes.is_empty() {
            r.bytes = bytes;
        }
    });
}

/// Queues a copy of `answer` for `client` on `listener` when a batch is open (true);
/// otherwise (false) it is the caller's to send at once.
pub(crate) fn queue(listener: &Arc<UdpSocket>, client: SocketAddr, answer: &[u8]) -> bool {
    REPLIES.with(|r| {
        let mut r = r.borrow_mut();
        if !r.open {
            return false;
        }
        let start = r.bytes.len();
        r.bytes.extend_from_slice(answer);
        let end = r.bytes.len();
        r.queued.push((listener.clone(), client, start..end));
        true
    })
}
