//! A sandbox's live log: the recent output of its processes, each chunk with when it was
//! written and which process and stream it came from, kept in a bounded ring and sent to
//! followers as it happens.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::broadcast;

/// The most bytes of output a sandbox's log keeps; older chunks are dropped first.
pub const MAX_LOG_BYTES: usize = 1 << 20;

/// How many entries a follower may fall behind before it misses some (and is told so).
const FOLLOWER_BACKLOG: usize = 1024;

/// One chunk of output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// When it was written, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The process, by its pid in the sandbox.
    pub pid: u32,
    /// `stdout`, `stderr` or `pty`.
    pub stream: &'static str,
    /// The bytes.
    pub data: Bytes,
}

/// The log of one sandbox.
#[derive(Debug)]
pub struct SandboxLog {
    ring: Mutex<(VecDeque<LogEntry>, usize)>,
    live: broadcast::Sender<LogEntry>,
}

impl Default for SandboxLog {
    fn default() -> Self {
        Self { ring: Mutex::default(), live: broadcast::channel(FOLLOWER_BACKLOG).0 }
    }
}

impl SandboxLog {
    fn ring(&self) -> MutexGuard<'_, (VecDeque<LogEntry>, usize)> {
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends output of process `pid`.
    pub fn append(&self, pid: u32, stream: &'static str, data: Bytes) {
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let entry = LogEntry { at_ms, pid, stream, data };
        {
            let mut ring = self.ring();
            let (entries, bytes) = &mut *ring;
            *bytes += entry.data.len();
            entries.push_back(entry.clone());
            while *bytes > MAX_LOG_BYTES {
                let Some(old) = entries.pop_front() else { break };
                *bytes -= old.data.len();
            }
        }
        // No follower is not an error.
        let _ = self.live.send(entry);
    }

    /// What the log holds now, and a receiver of what comes after (subscribed under the same
    /// lock, so that nothing falls between the two).
    pub fn follow(&self) -> (Vec<LogEntry>, broadcast::Receiver<LogEntry>) {
        let ring = self.ring();
        (ring.0.iter().cloned().collect(), self.live.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_bytes() {
        let log = SandboxLog::default();
        let chunk = Bytes::from(vec![b'x'; MAX_LOG_BYTES / 4 + 1]);
        for pid in 0..8 {
            log.append(pid, "stdout", chunk.clone());
        }
        let (kept, _) = log.follow();
        assert_eq!(kept.len(), 3, "the oldest dropped");
        assert_eq!(kept.last().map(|e| e.pid), Some(7));
    }

    #[tokio::test]
    async fn followers_see_what_comes_after() {
        let log = SandboxLog::default();
        log.append(1, "stdout", Bytes::from_static(b"before"));
        let (past, mut live) = log.follow();
        log.append(2, "stderr", Bytes::from_static(b"after"));
        assert_eq!(past.len(), 1);
        let next = live.recv().await.expect("an entry");
        assert_eq!((next.pid, next.stream, next.data.as_ref()), (2, "stderr", b"after".as_ref()));
    }
}
