//! The backend's blocking client for cerebrod: the control socket plus the
//! shared-memory regions batches travel in.
//!
//! Every wait has a deadline and polls for query cancellation, so a cancelled
//! query returns at once.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cerebro_shared::protocol::{self, Request, Response, PROTOCOL_VERSION};
use memmap2::{MmapMut, MmapOptions};
use pgrx::pg_sys;

use crate::error::{CerebroError, Result};

/// How often a wait wakes up to look for a cancel request.
const POLL: Duration = Duration::from_millis(50);

pub struct DaemonClient {
    stream: UnixStream,
    buffer: Vec<u8>,
    timeout_ms: i32,
}

fn cancel_requested() -> bool {
    // SAFETY: reads of signal-set flags, as CHECK_FOR_INTERRUPTS does.
    unsafe {
        std::ptr::read_volatile(&raw const pg_sys::QueryCancelPending) != 0
            || std::ptr::read_volatile(&raw const pg_sys::ProcDiePending) != 0
    }
}

impl DaemonClient {
    /// Connects and shakes hands.
    pub fn connect(socket: &str, timeout_ms: i32) -> Result<DaemonClient> {
        let unavailable = |reason: String| CerebroError::DaemonUnavailable { socket: socket.to_owned(), reason };
        let stream = UnixStream::connect(socket).map_err(|e| unavailable(e.to_string()))?;
        stream.set_read_timeout(Some(POLL)).map_err(|e| unavailable(e.to_string()))?;
        stream
            .set_write_timeout(Some(Duration::from_millis(timeout_ms as u64)))
            .map_err(|e| unavailable(e.to_string()))?;
        let mut client = DaemonClient { stream, buffer: Vec::new(), timeout_ms };
        let hello =
            Request::Hello { protocol: PROTOCOL_VERSION, client: format!("cerebro {}", env!("CARGO_PKG_VERSION")) };
        match client.call(&hello)? {
            Response::Hello { .. } => Ok(client),
            other => Err(CerebroError::Protocol(format!("expected hello, got {other:?}"))),
        }
    }

    pub fn send(&mut self, request: &Request) -> Result<()> {
        self.stream.write_all(&protocol::encode(request)).map_err(|e| CerebroError::Connection(e.into()))
    }

    /// Waits for the next response; daemon-reported errors become `Err`.
    pub fn recv(&mut self) -> Result<Response> {
        let deadline = Instant::now() + Duration::from_millis(self.timeout_ms as u64);
        let mut chunk = [0u8; 4096];
        loop {
            if self.buffer.len() >= 4 {
                let len = protocol::payload_len(self.buffer[..4].try_into().expect("4 bytes"))?;
                if self.buffer.len() >= 4 + len {
                    let response: Response = protocol::decode(&self.buffer[4..4 + len])?;
                    self.buffer.drain(..4 + len);
                    return match response {
                        Response::Error(e) => Err(CerebroError::Daemon(e)),
                        r => Ok(r),
                    };
                }
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(CerebroError::Connection(protocol::FrameError::Closed)),
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                    if cancel_requested() {
                        return Err(CerebroError::Interrupted);
                    }
                    if Instant::now() >= deadline {
                        return Err(CerebroError::Timeout(self.timeout_ms));
                    }
                }
                Err(e) => return Err(CerebroError::Connection(e.into())),
            }
        }
    }

    pub fn call(&mut self, request: &Request) -> Result<Response> {
        self.send(request)?;
        self.recv()
    }
}

static NEXT_REGION: AtomicU64 = AtomicU64::new(0);

/// A shared-memory region: a file under /dev/shm mapped here, and by cerebrod
/// once attached. The file is unlinked as soon as cerebrod has mapped it, so
/// nothing is left behind whatever happens to either process afterwards.
pub struct Region {
    path: PathBuf,
    pub map: MmapMut,
    linked: bool,
}

impl Region {
    pub fn create(len: usize) -> Result<Region> {
        let path = PathBuf::from(format!(
            "/dev/shm/cerebro-{}-{}",
            std::process::id(),
            NEXT_REGION.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(CerebroError::SharedMemory)?;
        let fail = |e: std::io::Error| {
            let _ = std::fs::remove_file(&path);
            CerebroError::SharedMemory(e)
        };
        file.set_len(len as u64).map_err(fail)?;
        // SAFETY: a fresh private file of exactly `len` bytes.
        let map = unsafe { MmapOptions::new().len(len).map_mut(&file) }.map_err(fail)?;
        Ok(Region { path, map, linked: true })
    }

    pub fn path(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn unlink(&mut self) {
        if std::mem::take(&mut self.linked) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        self.unlink();
    }
}
