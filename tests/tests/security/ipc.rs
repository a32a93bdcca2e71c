//! The socket and the scoring regions against other local users.

use std::collections::HashSet;
use std::io::Read;
use std::net::Shutdown;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use cerebro_tests::{daemon_log, wait_until_done, Daemon, Env};
use tokio_postgres::Client;

use crate::TRAIN_TIMEOUT;

const TELCO_ROWS: i64 = 7043;

fn running_as_root() -> anyhow::Result<bool> {
    let out = Command::new("id").arg("-u").output()?;
    Ok(String::from_utf8(out.stdout)?.trim() == "0")
}

fn uid_of(user: &str) -> anyhow::Result<u32> {
    let out = Command::new("id").args(["-u", user]).output()?;
    Ok(String::from_utf8(out.stdout)?.trim().parse()?)
}

/// Files a squatter made as the `nobody` OS user; removed when dropped.
struct Squatted(Vec<PathBuf>);

impl Squatted {
    /// `/dev/shm/cerebro-<pid>-0` .. `-15`, the names regions used to have, mode 0644.
    fn names_of(&mut self, pid: i32) -> anyhow::Result<()> {
        let paths: Vec<PathBuf> = (0..16).map(|n| PathBuf::from(format!("/dev/shm/cerebro-{pid}-{n}"))).collect();
        let list: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        let status = Command::new("runuser")
            .args(["-u", "nobody", "--", "sh", "-c", &format!("umask 022 && touch {}", list.join(" "))])
            .status()?;
        ensure!(status.success(), "nobody could not create the squatting files: {status}");
        for p in &paths {
            ensure!(std::fs::metadata(p)?.uid() == uid_of("nobody")?, "{} belongs to nobody", p.display());
        }
        self.0.extend(paths);
        Ok(())
    }
}

impl Drop for Squatted {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Every `/dev/shm/cerebro-*` there is.
fn shm_cerebro_files() -> anyhow::Result<HashSet<PathBuf>> {
    let mut found = HashSet::new();
    for entry in std::fs::read_dir("/dev/shm")? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with("cerebro-") {
            found.insert(entry.path());
        }
    }
    Ok(found)
}

async fn backend_pid(db: &Client) -> anyhow::Result<i32> {
    Ok(db.query_one("SELECT pg_backend_pid()", &[]).await?.get(0))
}

async fn scored_rows(db: &Client, model: &str) -> anyhow::Result<i64> {
    let sql = format!("SELECT count(*) FROM cerebro.predictions WHERE model = '{model}'");
    Ok(db.query_one(sql.as_str(), &[]).await.context("scoring")?.get(0))
}

#[tokio::test(flavor = "multi_thread")]
async fn ipc_squatted_shm_names_do_not_stop_scoring() -> anyhow::Result<()> {
    if !running_as_root()? {
        eprintln!("SKIPPED: squatting as another OS user needs root (runuser)");
        return Ok(());
    }
    let env = Env::from_env();
    let _daemon = Daemon::start(&env)?;
    let admin = env.connect().await?;
    admin
        .batch_execute(
            "INSERT INTO cerebro.models (name, source, target, key, options)
             VALUES ('sec_shm', 'telco_churn', 'churn', 'customer_id', '{\"epochs\": 2}')",
        )
        .await?;
    let version: i32 =
        admin.query_one("SELECT max(version) FROM cerebro.models WHERE name = 'sec_shm'", &[]).await?.get(0);
    let seen = wait_until_done(&admin, "sec_shm", version, TRAIN_TIMEOUT).await?;
    ensure!(seen.last().map(String::as_str) == Some("ready"), "sec_shm ended {seen:?}");

    let before = shm_cerebro_files()?;
    let mut squatted = Squatted(Vec::new());
    // The session under attack: a local user made every region name its
    // backend would have used before it scored anything.
    let db = env.connect().await?;
    squatted.names_of(backend_pid(&db).await?)?;
    assert_eq!(scored_rows(&db, "sec_shm").await?, TELCO_ROWS);
    for _ in 0..10 {
        let db = env.connect().await?;
        squatted.names_of(backend_pid(&db).await?)?;
        assert_eq!(scored_rows(&db, "sec_shm").await?, TELCO_ROWS);
    }
    // Scoring named nothing in /dev/shm.
    let squatted_names: HashSet<PathBuf> = squatted.0.iter().cloned().collect();
    let extra: Vec<PathBuf> =
        shm_cerebro_files()?.into_iter().filter(|p| !squatted_names.contains(p) && !before.contains(p)).collect();
    assert!(extra.is_empty(), "scoring left files in /dev/shm: {extra:?}");
    drop(squatted);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn ipc_the_socket_is_the_postgres_users_alone() -> anyhow::Result<()> {
    if !running_as_root()? {
        eprintln!("SKIPPED: connecting as another OS user needs root (runuser)");
        return Ok(());
    }
    let env = Env::from_env();
    let _daemon = Daemon::start(&env)?;
    let meta = std::fs::metadata(&env.socket)?;
    assert_eq!(meta.mode() & 0o777, 0o600, "socket mode {:o}", meta.mode() & 0o777);
    assert_eq!(meta.uid(), uid_of("postgres")?, "the socket belongs to the postgres OS user");
    assert!(daemon_log(&env).contains("socket mode 0600"), "the mode is logged at start");

    let script = format!(
        "import socket; s = socket.socket(socket.AF_UNIX); s.connect({:?})",
        env.socket.to_str().context("a UTF-8 socket path")?
    );
    let out = Command::new("runuser").args(["-u", "nobody", "--", "python3", "-c", &script]).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "nobody connected to the socket");
    assert!(stderr.contains("PermissionError") || stderr.contains("Permission denied"), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn ipc_refused_connections_cannot_flood_the_log() -> anyhow::Result<()> {
    if !running_as_root()? {
        eprintln!("SKIPPED: only root (whom file modes do not stop) can reach the socket to be refused");
        return Ok(());
    }
    let env = Env::from_env();
    let _daemon = Daemon::start(&env)?;
    let refused_lines = |log: &str| log.lines().filter(|l| l.contains("refused")).count();
    let before = refused_lines(&daemon_log(&env));
    for _ in 0..200 {
        // Root passes the file mode; the peer-uid check refuses it.
        let mut s = UnixStream::connect(&env.socket)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        // Closing our side ends cerebrod's drain at once.
        s.shutdown(Shutdown::Write)?;
        let mut reply = Vec::new();
        s.read_to_end(&mut reply)?;
        if !String::from_utf8_lossy(&reply).contains("permission denied") {
            bail!("expected a refusal, got {:?}", String::from_utf8_lossy(&reply));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = refused_lines(&daemon_log(&env)) - before;
    assert!(during <= 2, "{during} log lines for 200 refusals");
    // The count comes within the interval even though nobody knocks again.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let log = daemon_log(&env);
    let after = refused_lines(&log) - before;
    assert!(after <= 3, "{after} log lines for 200 refusals");
    assert!(log.lines().any(|l| l.contains("more connections since the last such line")), "the count is logged");
    Ok(())
}
