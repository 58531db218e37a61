//! Replies to clients gathered while a UDP shard works through a batch of received datagrams
//! (client queries, upstream answers), sent together when the batch is done: one sendmmsg per
//! listener instead of a sendto per reply. A batch belongs to the thread that receives, so it
//! is a thread-local; outside a batch, replies go at once.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use tracing::debug;

use crate::net;

/// Replies to clients gathered while a shard works through a batch of received datagrams,
/// sent together (one sendmmsg per listener) when the batch is done.
#[derive(Default)]
struct ReplyBatch {
    open: bool,
    queued: Vec<(Arc<UdpSocket>, SocketAddr, Vec<u8>)>,
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
        let queued = REPLIES.with(|r| {
            let mut r = r.borrow_mut();
            r.open = false;
            std::mem::take(&mut r.queued)
        });
        send_all(queued);
    }
}

/// Sends gathered replies, one sendmmsg per run of replies on the same listener. A reply the
/// listener's buffer cannot take now waits for room (at most `net::SEND_WAIT`).
fn send_all(mut queued: Vec<(Arc<UdpSocket>, SocketAddr, Vec<u8>)>) {
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
                let (_, client, bytes) = &run[i];
                (Some(*client), &bytes[..])
            });
            from += sent;
            match err {
                None => {}
                Some(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The send buffer is full: this one waits for room (the listener is a
                    // blocking socket), then the rest go batched again.
                    let (_, client, answer) = &queued[from];
                    if let Err(e) = listener.send_to(answer, *client) {
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
    // Keep the allocation for the next batch.
    queued.clear();
    REPLIES.with(|r| {
        let mut r = r.borrow_mut();
        if r.queued.capacity() < queued.capacity() && r.queued.is_empty() {
            r.queued = queued;
        }
    });
}

/// Queues `answer` for `client` on `listener` when a batch is open; otherwise hands it back
/// to be sent at once.
pub(crate) fn queue(
    listener: &Arc<UdpSocket>,
    client: SocketAddr,
    answer: Vec<u8>,
) -> Option<Vec<u8>> {
    REPLIES.with(|r| {
        let mut r = r.borrow_mut();
        if r.open {
            r.queued.push((listener.clone(), client, answer));
            None
        } else {
            Some(answer)
        }
    })
}
