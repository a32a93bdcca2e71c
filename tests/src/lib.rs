//! Harness for the end-to-end suite: the cluster deploy/test.sh prepared, and
//! cerebrod processes the tests start, kill and restart themselves.

use std::collections::HashMap;
use std::ffi::OsStr;
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
    /// PostgreSQL's binaries (pg_dump, pg_restore, pg_ctl).
    pub pgbin: String,
    /// The cluster's data directory, for tests that restart it
    /// (CEREBRO_E2E_PGDATA; tier 5 sets it).
    pub pgdata: Option<PathBuf>,
    /// The server log the cluster writes to (CEREBRO_E2E_PGLOG).
    pub pglog: Option<PathBuf>,
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
            pgdata: std::env::var_os("CEREBRO_E2E_PGDATA").map(PathBuf::from),
            pglog: std::env::var_os("CEREBRO_E2E_PGLOG").map(PathBuf::from),
        }
    }

    /// Runs `pg_ctl` on the cluster as deploy/lib.sh does, as the postgres
    /// OS user, with the server's output going to its log.
    pub fn pg_ctl(&self, args: &[&str]) -> Result<()> {
        let pgdata =
            self.pgdata.as_ref().context("CEREBRO_E2E_PGDATA is not set: run the tests with deploy/test.sh")?;
        let pglog = self.pglog.as_ref().context("CEREBRO_E2E_PGLOG is not set: run the tests with deploy/test.sh")?;
        let mut all: Vec<&OsStr> = vec!["-D".as_ref(), pgdata.as_os_str(), "-l".as_ref(), pglog.as_os_str()];
        all.extend(["-w", "-t", "120"].iter().chain(args).map(OsStr::new));
        as_postgres(&self.pgbin, "pg_ctl", &all)
    }

    /// Restarts the cluster in shutdown `mode` ("fast": every session is
    /// terminated; "immediate": every process is stopped at once and the
    /// server recovers from a crash), waiting until it accepts connections.
    /// The server's options (port, socket directory) are the ones it was
    /// started with.
    pub fn restart_postgres(&self, mode: &str) -> Result<()> {
        self.pg_ctl(&["-m", mode, "restart"])
    }

    /// The server log's length now, to read what is written after it with
    /// [`Env::server_log_since`].
    pub fn server_log_len(&self) -> u64 {
        self.pglog.as_ref().and_then(|p| std::fs::metadata(p).ok()).map_or(0, |m| m.len())
    }

    /// What the server wrote to its log after it was `from` bytes long.
    pub fn server_log_since(&self, from: u64) -> String {
        let Some(path) = &self.pglog else { return String::new() };
        let bytes = std::fs::read(path).unwrap_or_default();
        String::from_utf8_lossy(bytes.get(from as usize..).unwrap_or_default()).into_owned()
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

/// A command for `program` that runs with every file descriptor above 2
/// closed. What outlives a test (the postmaster pg_ctl restarts) must not
/// keep a descriptor the test process inherited: the lock of `flock
/// /tmp/cerebro-e2e.lock deploy/test.sh` would never be freed.
fn without_inherited_fds(program: &str) -> Command {
    let mut command = Command::new("bash");
    command
        .arg("-c")
        .arg(
            r#"for fd in /proc/$$/fd/*; do
                   fd=${fd##*/}
                   if [ "$fd" -gt 2 ] && [ -e "/proc/$$/fd/$fd" ]; then eval "exec $fd>&-"; fi
               done
               exec "$@""#,
        )
        .arg("bash")
        .arg(program);
    command
}

/// A hot standby of the test cluster (`pg_basebackup -R`, streaming from
/// it), in a directory and socket directory of its own; stopped at once
/// and removed when dropped.
pub struct Standby {
    dir: PathBuf,
    pgbin: String,
    port: String,
}

impl Standby {
    pub fn start(env: &Env) -> Result<Standby> {
        let dir = std::env::temp_dir().join(format!("cerebro-e2e-standby-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let (uid, gid) = postgres_ids()?;
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        let standby = Standby { dir, pgbin: env.pgbin.clone(), port: env.pgport.clone() };
        let data = standby.dir.join("data");
        let mut args: Vec<&OsStr> = ["-h", &env.pghost, "-p", &env.pgport, "-U", "postgres", "-R", "-X", "stream"]
            .into_iter()
            .map(OsStr::new)
            .collect();
        args.extend(["-c".as_ref(), "fast".as_ref(), "-D".as_ref(), data.as_os_str()]);
        as_postgres(&env.pgbin, "pg_basebackup", &args)?;
        // The primary's own settings come with the copy: only the socket
        // directory differs (no TCP, so the port may be the primary's).
        let options = format!("-k {} -c listen_addresses='' -c port={}", standby.dir.display(), standby.port);
        standby.pg_ctl(&["-w", "-t", "120", "-o", &options, "start"])?;
        Ok(standby)
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<()> {
        let (data, log) = (self.dir.join("data"), self.dir.join("postgresql.log"));
        let mut all: Vec<&OsStr> = vec!["-D".as_ref(), data.as_os_str(), "-l".as_ref(), log.as_os_str()];
        all.extend(args.iter().map(OsStr::new));
        as_postgres(&self.pgbin, "pg_ctl", &all)
    }

    /// Promotes it to a primary of its own, once it has replayed all it has.
    pub fn promote(&self) -> Result<()> {
        self.pg_ctl(&["-w", "-t", "120", "promote"])
    }

    /// A `database_url` (libpq keywords) for database `db` of the standby.
    pub fn url(&self, db: &str) -> String {
        format!("host={} port={} user=postgres dbname={db}", self.dir.display(), self.port)
    }

    pub async fn connect(&self, db: &str) -> Result<Client> {
        let (client, conn) =
            tokio_postgres::connect(&self.url(db), NoTls).await.context("connecting to the standby")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["-m", "immediate", "stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs PostgreSQL's `program` (from `pgbin`) as the postgres OS user, as
/// deploy/lib.sh does, with every inherited descriptor above 2 closed.
fn as_postgres(pgbin: &str, program: &str, args: &[&OsStr]) -> Result<()> {
    let out = without_inherited_fds("runuser")
        .args(["-u", "postgres", "--"])
        .arg(format!("{pgbin}/{program}"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed with {}: {}{}",
            args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
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

    /// Whether the process started is still running (it has not exited).
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
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

/// Whether a process with this pid exists.
fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn read_pid(path: &std::path::Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A cerebrod running under deploy/watchdog.sh, as deploy/lib.sh starts the
/// demo's: as the postgres OS user, started again 2 s after it dies. The
/// watchdog and the daemon are stopped (SIGTERM) when this is dropped.
pub struct Supervised {
    watchdog: Child,
    pidfile: PathBuf,
    watchdog_pidfile: PathBuf,
    socket: PathBuf,
}

impl Supervised {
    pub fn start(env: &Env) -> Result<Supervised> {
        let pidfile = env.socket.with_extension("pid");
        let watchdog_pidfile = env.socket.with_extension("watchdog.pid");
        let _ = std::fs::remove_file(&pidfile);
        // The watchdog appends to the log as postgres; Daemon::start may
        // have made it as root.
        let (uid, gid) = postgres_ids()?;
        OpenOptions::new().create(true).append(true).open(&env.log)?;
        std::os::unix::fs::chown(&env.log, Some(uid), Some(gid))
            .with_context(|| format!("giving {} to postgres", env.log.display()))?;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/watchdog.sh");
        let watchdog = without_inherited_fds("runuser")
            .args(["-u", "postgres", "--", "bash", script])
            .arg(&pidfile)
            .arg(&env.log)
            .arg(&env.daemon_bin)
            .arg("--config")
            .arg(&env.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting deploy/watchdog.sh")?;
        let supervised = Supervised { watchdog, pidfile, watchdog_pidfile, socket: env.socket.clone() };
        supervised.wait_serving(None, Duration::from_secs(30))?;
        Ok(supervised)
    }

    /// The daemon's pid now.
    pub fn pid(&self) -> Option<u32> {
        read_pid(&self.pidfile).filter(|&p| alive(p))
    }

    /// SIGKILL to the daemon (not the watchdog), as a crash would.
    pub fn kill_daemon(&self) -> Result<u32> {
        let pid = self.pid().context("no daemon is running under the watchdog")?;
        let status = Command::new("kill").args(["-KILL", &pid.to_string()]).status()?;
        if !status.success() {
            bail!("kill -KILL {pid} failed");
        }
        while alive(pid) && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z ")) {
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(pid)
    }

    /// Waits until a daemon other than `old` runs and accepts connections
    /// on the socket; returns its pid.
    pub fn wait_serving(&self, old: Option<u32>, timeout: Duration) -> Result<u32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pid) = self.pid().filter(|&p| Some(p) != old) {
                if UnixStream::connect(&self.socket).is_ok() {
                    return Ok(pid);
                }
            }
            if Instant::now() > deadline {
                bail!("no cerebrod (other than {old:?}) serves {} after {timeout:?}", self.socket.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if let Some(pid) = read_pid(&self.watchdog_pidfile) {
            let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && matches!(self.watchdog.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        // Should the watchdog not have stopped, nothing of it stays behind.
        for pid in [read_pid(&self.watchdog_pidfile), read_pid(&self.pidfile)].into_iter().flatten() {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
    }
}

/// Queues a version of `name` over telco_churn (target churn, key
/// customer_id) with `options` (JSON text); returns its version.
pub async fn insert_telco_model(db: &Client, name: &str, options: &str) -> Result<i32> {
    db.execute(
        "INSERT INTO cerebro.models (name, source, target, key, options)
         VALUES ($1, 'telco_churn', 'churn', 'customer_id', $2::text::jsonb)",
        &[&name, &options],
    )
    .await?;
    Ok(db.query_one("SELECT max(version) FROM cerebro.models WHERE name = $1", &[&name]).await?.get(0))
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

/// Attempts of a model version's job.
pub async fn job_attempts(db: &Client, name: &str, version: i32) -> Result<i32> {
    Ok(db
        .query_one(
            "SELECT j.attempts FROM cerebro.jobs j JOIN cerebro.model_versions m ON m.id = j.model_version_id
             WHERE m.name = $1 AND m.version = $2",
            &[&name, &version],
        )
        .await?
        .get(0))
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
