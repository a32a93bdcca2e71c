//! The control socket: backends connect, attach shared-memory regions and ask
//! for batches to be scored.
//!
//! Only processes running as the allowed uid (the PostgreSQL server's) are
//! served; any other peer gets one error frame and the connection is closed
//! and logged. ONNX Runtime work runs on blocking threads, never on the async
//! workers.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cerebro_shared::batch::{read_batch, write_outputs};
use cerebro_shared::error::{ErrorCode, WireError};
use cerebro_shared::protocol::{self, FrameError, Request, Response, ScoreRequest, PROTOCOL_VERSION};
use interprocess::local_socket::tokio::prelude::*;
use interprocess::local_socket::{GenericFilePath, ListenerOptions};
use memmap2::{MmapMut, MmapOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Mutex, Semaphore};
use tracing::{debug, info, warn};

use crate::catalog::Catalog;
use crate::scoring::{OnnxRuntime, ScoringModel};

/// Shared-memory regions must be files the backend made under this prefix.
pub const SHM_PREFIX: &str = "/dev/shm/cerebro-";
const MAX_REGIONS_PER_CONNECTION: usize = 16;
const MAX_REGION_BYTES: u64 = 4 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create the socket {path}: {source}")]
    Bind { path: PathBuf, source: std::io::Error },
}

/// Loads and caches scoring sessions, keyed by model version.
pub struct ScoringService {
    runtime: OnnxRuntime,
    catalog: Arc<Catalog>,
    cache: Mutex<HashMap<i64, (String, Arc<ScoringModel>)>>,
    capacity: usize,
}

impl ScoringService {
    pub fn new(runtime: OnnxRuntime, catalog: Arc<Catalog>, capacity: usize) -> ScoringService {
        ScoringService { runtime, catalog, cache: Mutex::new(HashMap::new()), capacity }
    }

    /// The session for `model_version_id`, loaded from the catalog on a miss.
    /// Refuses when the stored artifact is not the one the client expects.
    pub async fn model(&self, model_version_id: i64, expected_sha: &str) -> Result<Arc<ScoringModel>, WireError> {
        if let Some((sha, model)) = self.cache.lock().await.get(&model_version_id) {
            if sha == expected_sha {
                return Ok(model.clone());
            }
        }
        let artifact = self
            .catalog
            .artifact(model_version_id)
            .await
            .map_err(|e| WireError::new(ErrorCode::Unavailable, format!("cannot read the artifact: {e}")))?
            .ok_or_else(|| {
                WireError::new(ErrorCode::ModelNotFound, format!("model version {model_version_id} has no artifact"))
            })?;
        let sha = artifact.sha256.clone();
        if sha != expected_sha {
            return Err(WireError::new(
                ErrorCode::ModelNotFound,
                format!("model version {model_version_id} has artifact {sha}, not the expected {expected_sha}"),
            ));
        }
        let runtime = self.runtime.clone();
        let model = tokio::task::spawn_blocking(move || artifact.load(&runtime))
            .await
            .map_err(|e| WireError::new(ErrorCode::Internal, format!("model loading task failed: {e}")))?
            .map_err(|e| WireError::new(ErrorCode::ArtifactInvalid, e.to_string()))?;
        let model = Arc::new(model);
        let mut cache = self.cache.lock().await;
        if cache.len() >= self.capacity {
            if let Some(evict) = cache.keys().next().copied() {
                cache.remove(&evict);
            }
        }
        cache.insert(model_version_id, (sha, model.clone()));
        Ok(model)
    }
}

/// Creates the listening socket, replacing a stale socket file. Callers hold
/// the daemon lock, so no live daemon owns that file.
pub fn bind(path: &Path) -> Result<LocalSocketListener, ServerError> {
    let err = |source| ServerError::Bind { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => info!("removed stale socket {}", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let name = path.to_fs_name::<GenericFilePath>().map_err(err)?;
    let listener = ListenerOptions::new().name(name).create_tokio().map_err(err)?;
    // Everyone may reach the socket so that every refused peer is seen and
    // logged here; the peer-credential check is the gate.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(err)?;
    Ok(listener)
}

/// Accepts connections until shutdown.
pub async fn serve(
    listener: LocalSocketListener,
    service: Arc<ScoringService>,
    allowed_uid: u32,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(s) => s,
                Err(e) => {
                    warn!("accept failed: {e}");
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let creds = stream.peer_creds();
        let (uid, pid) = match &creds {
            Ok(c) => (c.euid(), c.pid()),
            Err(_) => (None, None),
        };
        if uid != Some(allowed_uid) {
            warn!(peer_uid = ?uid, peer_pid = ?pid, allowed_uid, "refused connection: peer is not the PostgreSQL server's user");
            let refusal = WireError::new(
                ErrorCode::BadRequest,
                format!("permission denied: cerebrod serves only uid {allowed_uid}, the PostgreSQL server's user"),
            );
            tokio::spawn(refuse(stream, refusal));
            continue;
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            warn!("refused connection: {max_connections} connections already open");
            let busy = WireError::new(ErrorCode::Unavailable, "cerebrod has too many open connections")
                .with_hint("Raise max_connections in cerebrod's configuration.");
            tokio::spawn(refuse(stream, busy));
            continue;
        };
        let service = service.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = Connection::default().run(stream, &service, shutdown).await {
                debug!(peer_pid = ?pid, "connection ended: {e}");
            }
            drop(permit);
        });
    }
}

/// Sends one error frame, then reads what the peer already sent before
/// closing: closing a Unix socket with unread data would reset the
/// connection and the peer would never read the reason.
async fn refuse(mut stream: LocalSocketStream, error: WireError) {
    let _ = stream.write_all(&protocol::encode(&Response::Error(error))).await;
    let mut sink = [0u8; 4096];
    let drain = async {
        let mut total = 0usize;
        while let Ok(n) = stream.read(&mut sink).await {
            total += n;
            if n == 0 || total > 1 << 16 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drain).await;
}

#[derive(Default)]
struct Connection {
    greeted: bool,
    regions: HashMap<u32, MmapMut>,
}

async fn read_request(stream: &mut LocalSocketStream) -> Result<Request, FrameError> {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await?;
    let mut payload = vec![0u8; protocol::payload_len(header)?];
    stream.read_exact(&mut payload).await?;
    protocol::decode(&payload)
}

impl Connection {
    async fn run(
        mut self,
        mut stream: LocalSocketStream,
        service: &ScoringService,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), FrameError> {
        loop {
            let request = tokio::select! {
                r = read_request(&mut stream) => r,
                _ = shutdown.changed() => return Ok(()),
            };
            let request = match request {
                Ok(r) => r,
                Err(FrameError::Malformed(e)) => {
                    let resp =
                        Response::Error(WireError::new(ErrorCode::BadRequest, format!("malformed request: {e}")));
                    stream.write_all(&protocol::encode(&resp)).await?;
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            let (response, keep_open) = self.handle(request, service).await;
            stream.write_all(&protocol::encode(&response)).await?;
            if !keep_open {
                return Ok(());
            }
        }
    }

    async fn handle(&mut self, request: Request, service: &ScoringService) -> (Response, bool) {
        match request {
            Request::Hello { protocol, client } => {
                if protocol != PROTOCOL_VERSION {
                    let e = WireError::new(
                        ErrorCode::ProtocolMismatch,
                        format!("client {client} speaks protocol {protocol}; cerebrod speaks {PROTOCOL_VERSION}"),
                    )
                    .with_hint("Install the same Cerebro version for the extension and the daemon.");
                    return (Response::Error(e), false);
                }
                self.greeted = true;
                (
                    Response::Hello {
                        protocol: PROTOCOL_VERSION,
                        server: format!("cerebrod {}", env!("CARGO_PKG_VERSION")),
                    },
                    true,
                )
            }
            _ if !self.greeted => {
                (Response::Error(WireError::new(ErrorCode::BadRequest, "the first message must be hello")), false)
            }
            Request::Attach { region, path, len } => match self.attach(region, &path, len) {
                Ok(()) => (Response::Attached { region }, true),
                Err(e) => (Response::Error(e), true),
            },
            Request::Score(req) => match self.score(req, service).await {
                Ok(resp) => (resp, true),
                Err(e) => (Response::Error(e), true),
            },
        }
    }

    fn attach(&mut self, region: u32, path: &str, len: u64) -> Result<(), WireError> {
        let bad = |msg: String| WireError::new(ErrorCode::BufferInvalid, msg);
        if !path.starts_with(SHM_PREFIX) || path[SHM_PREFIX.len()..].contains('/') {
            return Err(bad(format!("shared memory must be a file named {SHM_PREFIX}*, not {path}")));
        }
        if len == 0 || len > MAX_REGION_BYTES {
            return Err(bad(format!("region of {len} bytes; allowed: 1 to {MAX_REGION_BYTES}")));
        }
        if !self.regions.contains_key(&region) && self.regions.len() >= MAX_REGIONS_PER_CONNECTION {
            return Err(bad(format!("at most {MAX_REGIONS_PER_CONNECTION} regions per connection")));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| bad(format!("cannot open {path}: {e}")))?;
        let actual = file.metadata().map_err(|e| bad(format!("cannot stat {path}: {e}")))?.len();
        if actual < len {
            return Err(bad(format!("{path} has {actual} bytes, fewer than the {len} announced")));
        }
        // SAFETY: the mapping is of a file the peer created for this purpose;
        // the protocol gives the daemon exclusive use of a region between a
        // score request and its answer, and every read is bounds-checked.
        let map = unsafe { MmapOptions::new().len(len as usize).map_mut(&file) }
            .map_err(|e| bad(format!("cannot map {path}: {e}")))?;
        self.regions.insert(region, map);
        Ok(())
    }

    async fn score(&mut self, req: ScoreRequest, service: &ScoringService) -> Result<Response, WireError> {
        let model = service.model(req.model_version_id, &req.artifact_sha256).await?;
        let mut map = self
            .regions
            .remove(&req.region)
            .ok_or_else(|| WireError::new(ErrorCode::BadRequest, format!("region {} is not attached", req.region)))?;
        let layout = req.layout;
        let (map, result) = tokio::task::spawn_blocking(move || {
            let result = score_region(&model, &layout, &mut map);
            (map, result)
        })
        .await
        .map_err(|e| WireError::new(ErrorCode::Internal, format!("scoring task failed: {e}")))?;
        self.regions.insert(req.region, map);
        let rows = result?;
        Ok(Response::Scored { region: req.region, rows })
    }
}

fn score_region(
    model: &ScoringModel,
    layout: &cerebro_shared::batch::BatchLayout,
    region: &mut [u8],
) -> Result<u32, WireError> {
    let bad = |e: cerebro_shared::batch::LayoutError| WireError::new(ErrorCode::BufferInvalid, e.to_string());
    let columns = read_batch(layout, region).map_err(bad)?;
    let (scores, labels) =
        model.score(&columns).map_err(|e| WireError::new(ErrorCode::ScoringFailed, e.to_string()))?;
    write_outputs(layout, region, &scores, &labels).map_err(bad)?;
    Ok(layout.rows)
}
