//! The backend's blocking client for cerebrod: the control socket plus the
//! shared-memory regions batches travel in.
//!
//! Every wait has a deadline and polls for query cancellation, so a cancelled
//! query returns at once.

use std::io::{ErrorKind, IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use cerebro_shared::protocol::{self, Request, Response, PROTOCOL_VERSION};
use memmap2::{MmapMut, MmapOptions};
use pgrx::pg_sys;
use rustix::fs::{MemfdFlags, SealFlags};
use rustix::io::Errno;
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

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

    /// Whether the connection can take the next request: cerebrod never
    /// speaks unasked, so a socket with anything to read (a close, a stray
    /// answer) or left mid-frame cannot.
    pub fn is_idle(&self) -> bool {
        let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
        self.buffer.is_empty()
            && matches!(rustix::net::recv(&self.stream, &mut [0u8; 1], flags), Err(rustix::io::Errno::AGAIN))
    }

    /// Waits up to `timeout_ms` for each later answer (`cerebro.scoring_timeout`).
    pub fn set_timeout_ms(&mut self, timeout_ms: i32) -> Result<()> {
        self.timeout_ms = timeout_ms;
        self.stream
            .set_write_timeout(Some(Duration::from_millis(timeout_ms as u64)))
            .map_err(|e| CerebroError::Connection(e.into()))
    }

    pub fn send(&mut self, request: &Request) -> Result<()> {
        self.stream.write_all(&protocol::encode(request)).map_err(|e| CerebroError::Connection(e.into()))
    }

    /// Waits for the next response; daemon-reported errors become `Err`.
    pub fn recv(&mut self) -> Result<Response> {
        let deadline = Instant::now() + Duration::from_millis(self.timeout_ms as u64);
        let mut chunk = [0u8; 4096];
        let _shown = WaitShown::start();
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

    /// Attaches `memory` as region `region`: the Attach frame goes out with
    /// the region's descriptor (SCM_RIGHTS). Only with no request in flight.
    pub fn attach(&mut self, region: u32, memory: &Region) -> Result<()> {
        let frame = protocol::encode(&Request::Attach { region, len: memory.len() as u64 });
        let fds = [memory.fd.as_fd()];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        let pushed = control.push(SendAncillaryMessage::ScmRights(&fds));
        debug_assert!(pushed, "the buffer is sized for one descriptor");
        let connection = |e: std::io::Error| CerebroError::Connection(e.into());
        let sent = loop {
            match rustix::net::sendmsg(&self.stream, &[IoSlice::new(&frame)], &mut control, SendFlags::NOSIGNAL) {
                Ok(n) => break n,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(connection(e.into())),
            }
        };
        // The descriptor went with the first byte; what a short send left
        // is plain bytes.
        self.stream.write_all(&frame[sent..]).map_err(connection)?;
        match self.recv()? {
            Response::Attached { .. } => Ok(()),
            other => Err(CerebroError::Protocol(format!("expected attached, got {other:?}"))),
        }
    }
}

/// While it lives, `pg_stat_activity` shows the backend waiting on an
/// extension (`wait_event_type` and `wait_event` `Extension`), as it shows
/// one waiting on a lock or on the client: a query that waits for cerebrod
/// is not idle CPU. PostgreSQL clears it when a transaction aborts too.
struct WaitShown;

impl WaitShown {
    fn start() -> WaitShown {
        // SAFETY: my_wait_event_info points at this backend's own slot
        // (pgstat_report_wait_start's store, which is a static inline in C).
        unsafe { std::ptr::write_volatile(pg_sys::my_wait_event_info, pg_sys::PG_WAIT_EXTENSION) };
        WaitShown
    }
}

impl Drop for WaitShown {
    fn drop(&mut self) {
        // SAFETY: as in start: pgstat_report_wait_end's store.
        unsafe { std::ptr::write_volatile(pg_sys::my_wait_event_info, 0) };
    }
}

/// A shared-memory region: an anonymous memory file (memfd) mapped here and,
/// once attached, by cerebrod, which receives its descriptor over the socket.
/// It has no name anywhere, so no other user can squat, open or replace it,
/// and the kernel frees it when the last mapping and descriptor go, whatever
/// happens to either process.
pub struct Region {
    pub map: MmapMut,
    fd: OwnedFd,
}

impl Region {
    pub fn create(len: usize) -> Result<Region> {
        let shm = |e: Errno| CerebroError::SharedMemory(e.into());
        // Not inherited by programs the backend may run.
        let fd =
            rustix::fs::memfd_create("cerebro-region", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).map_err(shm)?;
        rustix::fs::ftruncate(&fd, len as u64).map_err(shm)?;
        // A fixed size lets cerebrod map it without fearing that the pages
        // go away under its mapping (SIGBUS); cerebrod checks the seals.
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL).map_err(shm)?;
        // SAFETY: a fresh memory file of exactly `len` bytes that cannot
        // shrink; only this backend and cerebrod map it, and the protocol
        // gives one of them a region at a time.
        let map = unsafe { MmapOptions::new().len(len).map_mut(&fd) }.map_err(CerebroError::SharedMemory)?;
        Ok(Region { map, fd })
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }
}

/// The socket option of SERVER cerebro_daemon, where cerebrod listens (what
/// the FDW reads from its server; a function reads it here).
pub fn server_socket() -> Result<String> {
    // SAFETY: a catalog lookup that returns NULL when the server is missing;
    // its options are a List of DefElem, each read as a string.
    unsafe {
        let server = pg_sys::GetForeignServerByName(c"cerebro_daemon".as_ptr(), true);
        if server.is_null() || (*server).options.is_null() {
            return Err(CerebroError::MissingSocket);
        }
        let options = (*server).options;
        for i in 0..(*options).length as usize {
            let option = (*(*options).elements.add(i)).ptr_value as *mut pg_sys::DefElem;
            if std::ffi::CStr::from_ptr((*option).defname) == c"socket" {
                return Ok(std::ffi::CStr::from_ptr(pg_sys::defGetString(option)).to_string_lossy().into_owned());
            }
        }
        Err(CerebroError::MissingSocket)
    }
}
