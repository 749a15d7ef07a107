//! The guest's standard output and error: streamed to the current execution's events as they
//! are written, each stream capped.
//!
//! A kernel outlives its cells, so its two streams write into one shared [`CellOutput`] that
//! is pointed at each cell's event sink in turn. Past a stream's cap the rest of the write is
//! cut, a marker line is sent, and the write traps, which stops the guest: the execution then
//! ends with `OutputLimitExceeded`.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use soulbox_runtime::{EventSink, ExecEvent, Limits, OutputStream};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream as WasiOutputStream, Pollable, StreamError};

/// The most bytes the guest may hand over in one write; WASI's usual permit size.
const MAX_WRITE_PERMIT: usize = 64 << 10;

/// What the current cell's output goes to, and how much of it has been written.
#[derive(Debug, Default)]
struct OutputState {
    sink: Option<EventSink>,
    caps: [u64; 2],
    written: [u64; 2],
    overflowed: Option<OutputStream>,
}

/// The shared output state of one kernel.
#[derive(Debug, Clone, Default)]
pub(crate) struct CellOutput(Arc<Mutex<OutputState>>);

impl CellOutput {
    fn lock(&self) -> MutexGuard<'_, OutputState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Points the output at a cell's events, with fresh counters and the cell's caps.
    pub(crate) fn begin(&self, sink: &EventSink, limits: &Limits) {
        let mut state = self.lock();
        state.sink = Some(sink.clone());
        state.caps = [limits.stdout_bytes, limits.stderr_bytes];
        state.written = [0, 0];
        state.overflowed = None;
    }

    /// Detaches the output from the cell; later writes are dropped. Returns the stream that
    /// passed its cap, if one did.
    pub(crate) fn end(&self) -> Option<OutputStream> {
        let mut state = self.lock();
        state.sink = None;
        state.overflowed
    }

    /// A handle for one of the two streams, to give to WASI.
    pub(crate) fn stream(&self, stream: OutputStream) -> GuestOutput {
        GuestOutput { output: self.clone(), stream }
    }

    fn write(&self, stream: OutputStream, bytes: &[u8]) -> Result<(), StreamError> {
        let mut state = self.lock();
        let index = stream_index(stream);
        let Some(sink) = state.sink.clone() else { return Ok(()) };
        let cap = state.caps[index];
        let room = usize::try_from(cap.saturating_sub(state.written[index])).unwrap_or(usize::MAX);
        let kept = &bytes[..bytes.len().min(room)];
        if !kept.is_empty() {
            state.written[index] += kept.len() as u64;
            sink.send(event(stream, Bytes::copy_from_slice(kept)));
        }
        if kept.len() == bytes.len() {
            return Ok(());
        }
        state.overflowed.get_or_insert(stream);
        let marker = format!("\n[soulbox: {stream} truncated at {cap} bytes]\n");
        sink.send(event(stream, Bytes::from(marker)));
        Err(StreamError::trap(&format!("{stream} passed its cap of {cap} bytes")))
    }
}

fn stream_index(stream: OutputStream) -> usize {
    match stream {
        OutputStream::Stdout => 0,
        OutputStream::Stderr => 1,
    }
}

fn event(stream: OutputStream, bytes: Bytes) -> ExecEvent {
    match stream {
        OutputStream::Stdout => ExecEvent::Stdout(bytes),
        OutputStream::Stderr => ExecEvent::Stderr(bytes),
    }
}

/// One stream of a kernel, as WASI sees it.
#[derive(Debug, Clone)]
pub(crate) struct GuestOutput {
    output: CellOutput,
    stream: OutputStream,
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn WasiOutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl WasiOutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.output.write(self.stream, &bytes)
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(MAX_WRITE_PERMIT)
    }
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let result = self.output.write(self.stream, buf).map(|()| buf.len());
        std::task::Poll::Ready(result.map_err(|e| std::io::Error::other(e.to_string())))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
