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
    /// How often the queue is polled besides LISTEN/NOTIFY.
    pub poll_interval_ms: u64,
    pub max_connections: usize,
    /// Models kept loaded for scoring.
    pub model_cache_size: usize,
    /// Most memory one stack of a selection's candidates may take while it
    /// trains (weights, optimiser state, activations); fewer candidates
    /// share a stack when theirs would take more.
    pub stack_memory_mib: usize,
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
            poll_interval_ms: 5000,
            max_connections: 256,
            model_cache_size: 32,
            stack_memory_mib: 2048,
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
    pub poll_interval: Duration,
    pub max_connections: usize,
    pub model_cache_size: usize,
    pub stack_memory_bytes: usize,
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
        Ok(Config {
            socket_path: f.socket_path,
            database_url: f.database_url,
            onnxruntime_library: f.onnxruntime_library,
            // SAFETY: geteuid has no preconditions and cannot fail.
            allowed_uid: f.allowed_uid.unwrap_or_else(|| unsafe { libc::geteuid() }),
            training_threads: threads_ok(f.training_threads, "training_threads")?,
            device: f.device.parse().map_err(ConfigError::Invalid)?,
            scoring_threads: threads_ok(f.scoring_threads, "scoring_threads")?,
            poll_interval: Duration::from_millis(f.poll_interval_ms),
            max_connections: f.max_connections.max(1),
            model_cache_size: f.model_cache_size.max(1),
            stack_memory_bytes: match f.stack_memory_mib {
                0 => return Err(ConfigError::Invalid("stack_memory_mib must be at least 1".into())),
                mib => mib.saturating_mul(1 << 20),
            },
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
    }
}
