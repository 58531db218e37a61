//! Replies to clients gathered while a UDP shard works through a batch of received datagrams
//! (client queries, upstream answers), sent together when the batch is done: one sendmmsg per
//! listener instead of a sendto per reply. Each shard is one thread, so the batch is a
//! thread-local; outside a batch, replies go at once.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use tokio::net::UdpSocket;
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
    /// Each UDP shard is one thread: its batch of replies.
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

/// Sends gathered replies, one sendmmsg per run of replies on the same listener. What the
/// listener's buffer cannot take now is sent by a task that waits for room.
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
                    // The send buffer is full: wait for room off this path.
                    let rest: Vec<(SocketAddr, Vec<u8>)> = queued[from..end]
                        .iter_mut()
                        .map(|(_, client, bytes)| (*client, std::mem::take(bytes)))
                        .collect();
                    let listener = listener.clone();
                    tokio::spawn(async move {
                        for (client, answer) in rest {
                            if let Err(e) = listener.send_to(&answer, client).await {
                                debug!(%client, error = %e, "UDP answer not sent");
                            }
                        }
                    });
                    from = end;
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
