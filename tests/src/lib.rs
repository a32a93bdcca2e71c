//! Harness for the end-to-end suite: the cluster deploy/test.sh prepared, and
//! cerebrod processes the tests start, kill and restart themselves.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio_postgres::{Client, NoTls};

/// Where deploy/test.sh put things, from CEREBRO_E2E_* variables.
#[derive(Debug, Clone)]
pub struct Env {
    pub pghost: String,
    pub pgport: String,
    pub db: String,
    pub daemon_bin: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    /// A Python with the onnxruntime package.
    pub python: PathBuf,
    /// PostgreSQL's binaries (pg_dump, pg_restore).
    pub pgbin: String,
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run the end-to-end tests with deploy/test.sh"))
}

impl Env {
    pub fn from_env() -> Env {
        Env {
            pghost: var("CEREBRO_E2E_PGHOST"),
            pgport: var("CEREBRO_E2E_PGPORT"),
            db: var("CEREBRO_E2E_DB"),
            daemon_bin: var("CEREBRO_E2E_DAEMON").into(),
            config: var("CEREBRO_E2E_CONFIG").into(),
            socket: var("CEREBRO_E2E_SOCKET").into(),
            log: var("CEREBRO_E2E_LOG").into(),
            python: var("CEREBRO_E2E_PYTHON").into(),
            pgbin: var("CEREBRO_E2E_PGBIN"),
        }
    }

    /// The same set-up with `lines` added to the daemon's config, written
    /// beside it as `<config>.<name>.toml`.
    pub fn with_config_lines(&self, name: &str, lines: &str) -> Result<Env> {
        let mut text = std::fs::read_to_string(&self.config).context("reading the e2e daemon config")?;
        text.push_str(lines);
        let path = self.config.with_extension(format!("{name}.toml"));
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(Env { config: path, ..self.clone() })
    }

    /// The same set-up with config key `key` set to `value` (a TOML value),
    /// written beside the config as `<config>.<name>.toml`.
    pub fn with_config_value(&self, name: &str, key: &str, value: &str) -> Result<Env> {
        let text = std::fs::read_to_string(&self.config).context("reading the e2e daemon config")?;
        let mut lines: Vec<String> =
            text.lines().filter(|l| l.split('=').next().map(str::trim) != Some(key)).map(String::from).collect();
        lines.push(format!("{key} = {value}"));
        let path = self.config.with_extension(format!("{name}.toml"));
        std::fs::write(&path, lines.join("\n") + "\n").with_context(|| format!("writing {}", path.display()))?;
        Ok(Env { config: path, ..self.clone() })
    }

    /// A connection that records every notice and warning the server sends.
    pub async fn connect_recording_notices(&self) -> Result<(Client, std::sync::Arc<std::sync::Mutex<Vec<String>>>)> {
        use futures_util::StreamExt;
        let url = format!("host={} port={} user=postgres dbname={}", self.pghost, self.pgport, self.db);
        let (client, mut conn) =
            tokio_postgres::connect(&url, NoTls).await.context("connecting to the e2e database")?;
        let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = notices.clone();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let tokio_postgres::AsyncMessage::Notice(n) = message {
                    sink.lock().expect("notice log").push(format!("{}: {}", n.severity(), n.message()));
                }
            }
        });
        Ok((client, notices))
    }

    pub async fn connect(&self) -> Result<Client> {
        self.connect_to(&self.db).await
    }

    /// A connection to another database of the same cluster.
    pub async fn connect_to(&self, db: &str) -> Result<Client> {
        self.connect_as("postgres", db).await
    }

    /// A connection as `role` (the test cluster trusts local connections).
    pub async fn connect_as(&self, role: &str, db: &str) -> Result<Client> {
        let url = format!("host={} port={} user={role} dbname={db}", self.pghost, self.pgport);
        let (client, conn) = tokio_postgres::connect(&url, NoTls).await.context("connecting to the e2e database")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }
}

fn postgres_ids() -> Result<(u32, u32)> {
    let id = |flag: &str| -> Result<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output()?;
        Ok(String::from_utf8(out.stdout)?.trim().parse()?)
    };
    Ok((id("-u")?, id("-g")?))
}

/// A cerebrod process running as the postgres OS user; killed when dropped.
pub struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
}

impl Daemon {
    pub fn start(env: &Env) -> Result<Daemon> {
        let (uid, gid) = postgres_ids()?;
        let log = OpenOptions::new().create(true).append(true).open(&env.log)?;
        let child = Command::new(&env.daemon_bin)
            .arg("--config")
            .arg(&env.config)
            .uid(uid)
            .gid(gid)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting cerebrod")?;
        let mut daemon = Daemon { child: Some(child), socket: env.socket.clone() };
        let deadline = Instant::now() + Duration::from_secs(30);
        // A stale socket file refuses connections; a live daemon accepts.
        while UnixStream::connect(&env.socket).is_err() {
            if let Some(status) = daemon.child.as_mut().expect("child").try_wait()? {
                bail!("cerebrod exited at start-up with {status}; see {}", env.log.display());
            }
            if Instant::now() > deadline {
                bail!("cerebrod did not open {} in 30 s", env.socket.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(daemon)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: the daemon gets no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: a graceful stop.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            Command::new("kill").args(["-TERM", &c.id().to_string()]).status()?;
            let status = c.wait()?;
            if !status.success() {
                bail!("cerebrod stopped with {status}");
            }
        }
        let _ = std::fs::metadata(&self.socket);
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Status, epoch and error of a model version.
pub async fn model_state(db: &Client, name: &str, version: i32) -> Result<(String, i32, Option<String>)> {
    let row = db
        .query_one(
            "SELECT status, epoch, error FROM cerebro.models WHERE name = $1 AND version = $2",
            &[&name, &version],
        )
        .await?;
    Ok((row.get(0), row.get(1), row.get(2)))
}

/// Polls until the version has finished (ready, failed, cancelled or deleted);
/// returns every status seen, in order.
pub async fn wait_until_done(db: &Client, name: &str, version: i32, timeout: Duration) -> Result<Vec<String>> {
    let deadline = Instant::now() + timeout;
    let mut seen: Vec<String> = Vec::new();
    loop {
        let (status, _, _) = model_state(db, name, version).await?;
        if seen.last() != Some(&status) {
            seen.push(status.clone());
        }
        if matches!(status.as_str(), "ready" | "failed" | "cancelled" | "deleted") {
            return Ok(seen);
        }
        if Instant::now() > deadline {
            bail!("{name} v{version} still {status} after {timeout:?}; seen {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls until `pred(status, epoch)` holds.
pub async fn wait_for(
    db: &Client,
    name: &str,
    version: i32,
    timeout: Duration,
    pred: impl Fn(&str, i32) -> bool,
) -> Result<(String, i32)> {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, epoch, _) = model_state(db, name, version).await?;
        if pred(&status, epoch) {
            return Ok((status, epoch));
        }
        if Instant::now() > deadline {
            bail!("{name} v{version}: condition not met in {timeout:?} (status {status}, epoch {epoch})");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// (label, score) by key, as `cerebrod score` computes them inside the daemon.
pub fn daemon_scores(env: &Env, model: &str, extra: &[&str]) -> Result<HashMap<String, (Option<String>, f64)>> {
    let out = Command::new(&env.daemon_bin)
        .arg("--config")
        .arg(&env.config)
        .args(["score", "--model", model])
        .args(extra)
        .output()
        .context("running cerebrod score")?;
    if !out.status.success() {
        bail!("cerebrod score failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8(out.stdout)?;
    let mut rows = HashMap::new();
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.splitn(3, ',').collect();
        let unquote = |s: &str| s.trim_matches('"').replace("\"\"", "\"");
        let label = (!fields[1].is_empty()).then(|| unquote(fields[1]));
        rows.insert(unquote(fields[0]), (label, fields[2].parse::<f64>()?));
    }
    Ok(rows)
}

pub fn daemon_log(env: &Env) -> String {
    std::fs::read_to_string(&env.log).unwrap_or_default()
}
