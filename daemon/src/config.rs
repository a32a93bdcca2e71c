//! cerebrod's configuration: a TOML file with defaults, validated into
//! [`Config`] before anything starts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::engine::DeviceChoice;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

/// The lock_timeout_ms values accepted: from a tenth of a second to ten minutes.
const LOCK_TIMEOUT_MS: std::ops::RangeInclusive<u64> = 100..=600_000;

/// The file as written; every field has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// Where the control socket is created.
    pub socket_path: PathBuf,
    /// libpq-style connection string of the database holding the extension.
    pub database_url: String,
    /// Path of libonnxruntime.so (1.31).
    pub onnxruntime_library: PathBuf,
    /// Only processes running as this uid may connect; default: cerebrod's own
    /// uid, which must be the PostgreSQL server's.
    pub allowed_uid: Option<u32>,
    /// Threads each training job splits its minibatches across (on CPU).
    pub training_threads: usize,
    /// Where jobs train: "cpu", "cuda" (GPU 0), "cuda:N", or "auto" (GPU 0
    /// when one is usable, else the CPU).
    pub device: String,
    pub scoring_threads: usize,
    /// Whether models Cerebro trained are scored by the engine itself, once
    /// it agrees with ONNX Runtime on them (false: ONNX Runtime scores all).
    pub native_scoring: bool,
    /// How often the queue is polled besides LISTEN/NOTIFY.
    pub poll_interval_ms: u64,
    pub max_connections: usize,
    /// Longest one batch may take to score; a longer run is stopped and the
    /// query fails saying so.
    pub scoring_deadline_ms: u64,
    /// Models kept loaded for scoring.
    pub model_cache_size: usize,
    /// Most memory one stack of a selection's candidates may take while it
    /// trains (weights, optimiser state, activations); fewer candidates
    /// share a stack when theirs would take more.
    pub stack_memory_mib: usize,
    /// Most memory the snapshots kept for later stacks may take
    /// ([`crate::snapshot_cache`]); 0 keeps none.
    pub snapshot_cache_mib: usize,
    /// Most memory one model may take while it trains: a model that needs
    /// more fails with the reason instead of taking the daemon's memory (and,
    /// through the kernel's OOM killer, every other role's training).
    pub model_memory_mib: usize,
    /// Most work one job may be, in rows read times epochs: a job beyond it
    /// fails with the reason. The backends refuse such an INSERT first
    /// (`cerebro.max_training_work`); this is the daemon operator's own bound.
    pub max_training_work: u64,
    /// Longest cerebrod waits for a row or table lock another transaction
    /// holds before it gives up on that write (and retries it later), so that
    /// a user's open transaction cannot hold training up.
    pub lock_timeout_ms: u64,
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            socket_path: PathBuf::from("/run/cerebro/cerebrod.sock"),
            database_url: "host=/var/run/postgresql user=postgres dbname=postgres".into(),
            onnxruntime_library: PathBuf::from("/usr/lib/cerebro/libonnxruntime.so.1.31.1"),
            allowed_uid: None,
            training_threads: 1,
            device: "cpu".into(),
            scoring_threads: 1,
            native_scoring: true,
            poll_interval_ms: 5000,
            max_connections: 256,
            scoring_deadline_ms: 60_000,
            model_cache_size: 32,
            stack_memory_mib: 2048,
            snapshot_cache_mib: 1024,
            model_memory_mib: 8192,
            max_training_work: 10_000_000_000,
            lock_timeout_ms: 5000,
        }
    }
}

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub socket_path: PathBuf,
    pub database_url: String,
    pub onnxruntime_library: PathBuf,
    pub allowed_uid: u32,
    pub training_threads: usize,
    pub device: DeviceChoice,
    pub scoring_threads: usize,
    pub native_scoring: bool,
    pub poll_interval: Duration,
    pub max_connections: usize,
    pub scoring_deadline: Duration,
    pub model_cache_size: usize,
    pub stack_memory_bytes: usize,
    pub snapshot_cache_bytes: usize,
    pub model_memory_bytes: usize,
    pub max_training_work: u64,
    pub lock_timeout: Duration,
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let file: FileConfig = toml::from_str(&text)
            .map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
        Config::try_from(file)
    }
}

impl TryFrom<FileConfig> for Config {
    type Error = ConfigError;

    fn try_from(f: FileConfig) -> Result<Config, ConfigError> {
        // sockaddr_un holds 108 bytes including the terminating NUL.
        if f.socket_path.as_os_str().len() > 107 {
            return Err(ConfigError::Invalid(format!(
                "socket_path {} is longer than the 107 bytes a Unix socket path may have",
                f.socket_path.display()
            )));
        }
        if f.database_url.trim().is_empty() {
            return Err(ConfigError::Invalid("database_url is empty".into()));
        }
        // Checked here, so that a typo stops cerebrod at once instead of
        // failing every try to reach the database.
        if let Err(e) = f.database_url.parse::<tokio_postgres::Config>() {
            return Err(ConfigError::Invalid(format!(
                "database_url is not a valid connection string: {}",
                crate::catalog::describe(&e)
            )));
        }
        let threads_ok = |n: usize, name: &str| {
            if (1..=1024).contains(&n) {
                Ok(n)
            } else {
                Err(ConfigError::Invalid(format!("{name} must be between 1 and 1024, not {n}")))
            }
        };
        if f.poll_interval_ms < 100 {
            return Err(ConfigError::Invalid("poll_interval_ms must be at least 100".into()));
        }
        // 0 would mean waiting forever: any user's open transaction could
        // then stop training for everyone.
        if !LOCK_TIMEOUT_MS.contains(&f.lock_timeout_ms) {
            return Err(ConfigError::Invalid(format!(
                "lock_timeout_ms must be between {} and {}, not {}",
                LOCK_TIMEOUT_MS.start(),
                LOCK_TIMEOUT_MS.end(),
                f.lock_timeout_ms
            )));
        }
        Ok(Config {
            socket_path: f.socket_path,
            database_url: f.database_url,
            onnxruntime_library: f.onnxruntime_library,
            // SAFETY: geteuid has no preconditions and cannot fail.
            allowed_uid: f.allowed_uid.unwrap_or_else(|| unsafe { libc::geteuid() }),
            training_threads: threads_ok(f.training_threads, "training_threads")?,
            device: f.device.parse().map_err(ConfigError::Invalid)?,
            scoring_threads: threads_ok(f.scoring_threads, "scoring_threads")?,
            native_scoring: f.native_scoring,
            poll_interval: Duration::from_millis(f.poll_interval_ms),
            max_connections: f.max_connections.max(1),
            scoring_deadline: match f.scoring_deadline_ms {
                ms if ms < 100 => {
                    return Err(ConfigError::Invalid(format!("scoring_deadline_ms must be at least 100, not {ms}")))
                }
                ms => Duration::from_millis(ms),
            },
            model_cache_size: f.model_cache_size.max(1),
            snapshot_cache_bytes: f.snapshot_cache_mib.saturating_mul(1 << 20),
            stack_memory_bytes: match f.stack_memory_mib {
                0 => return Err(ConfigError::Invalid("stack_memory_mib must be at least 1".into())),
                mib => mib.saturating_mul(1 << 20),
            },
            model_memory_bytes: match f.model_memory_mib {
                0 => return Err(ConfigError::Invalid("model_memory_mib must be at least 1".into())),
                mib => mib.saturating_mul(1 << 20),
            },
            max_training_work: match f.max_training_work {
                0 => return Err(ConfigError::Invalid("max_training_work must be at least 1".into())),
                work => work,
            },
            lock_timeout: Duration::from_millis(f.lock_timeout_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_fields_override() {
        let c = Config::try_from(FileConfig::default()).unwrap();
        assert_eq!(c.poll_interval, Duration::from_secs(5));
        assert_eq!(c.lock_timeout, Duration::from_secs(5));
        let f: FileConfig =
            toml::from_str("socket_path = '/tmp/x.sock'\nallowed_uid = 7\ntraining_threads = 2").unwrap();
        let c = Config::try_from(f).unwrap();
        assert_eq!(c.socket_path, PathBuf::from("/tmp/x.sock"));
        assert_eq!(c.allowed_uid, 7);
        assert_eq!(c.training_threads, 2);
        assert_eq!(c.device, DeviceChoice::Cpu);
        let f: FileConfig = toml::from_str("device = 'cuda:1'").unwrap();
        assert_eq!(Config::try_from(f).unwrap().device, DeviceChoice::Cuda(1));
    }

    #[test]
    fn bad_values_are_refused_with_the_field_named() {
        assert!(toml::from_str::<FileConfig>("sockt_path = 'x'").is_err());
        let long = FileConfig { socket_path: PathBuf::from("/".repeat(120)), ..Default::default() };
        assert!(Config::try_from(long).unwrap_err().to_string().contains("socket_path"));
        let threads = FileConfig { scoring_threads: 0, ..Default::default() };
        assert!(Config::try_from(threads).unwrap_err().to_string().contains("scoring_threads"));
        let device = FileConfig { device: "gpu".into(), ..Default::default() };
        assert!(Config::try_from(device).unwrap_err().to_string().contains("device must be"));
        let url = FileConfig { database_url: "host=/tmp dbname='unclosed".into(), ..Default::default() };
        let e = Config::try_from(url).unwrap_err().to_string();
        assert!(e.contains("database_url is not a valid connection string"), "{e}");
    }

    #[test]
    fn lock_timeout_is_bounded_and_never_zero() {
        let f: FileConfig = toml::from_str("lock_timeout_ms = 1000").unwrap();
        assert_eq!(Config::try_from(f).unwrap().lock_timeout, Duration::from_secs(1));
        for bad in [0, 99, 600_001] {
            let f = FileConfig { lock_timeout_ms: bad, ..Default::default() };
            let e = Config::try_from(f).unwrap_err().to_string();
            assert!(e.contains("lock_timeout_ms") && e.contains(&bad.to_string()), "{e}");
        }
        for good in [100, 600_000] {
            let f = FileConfig { lock_timeout_ms: good, ..Default::default() };
            assert_eq!(Config::try_from(f).unwrap().lock_timeout, Duration::from_millis(good));
        }
        assert!(toml::from_str::<FileConfig>("lock_timeout_ms = -1").is_err());
    }
}
