//! cerebrod's command line: run the daemon, or score a relation offline.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use cerebro_daemon::config::Config;
use clap::{Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

#[derive(Parser)]
#[command(name = "cerebrod", version, about = "Cerebro's daemon: trains, exports and scores models")]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, short, default_value = "/etc/cerebro/cerebrod.toml", global = true)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default).
    Run,
    /// Score every row of a relation inside the daemon and print CSV
    /// (key,label,score): the reference for checking SQL predictions.
    Score {
        #[arg(long)]
        model: String,
        #[arg(long)]
        version: Option<i32>,
        /// Relation to score; default: the model's training source.
        #[arg(long)]
        source: Option<String>,
        /// Key column to print; default: the model's key column.
        #[arg(long)]
        key: Option<String>,
    },
    /// Validate the configuration file and exit.
    CheckConfig,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cerebrod: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// How long a stopped daemon waits for its blocking tasks before it exits.
const SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::from_file(&cli.config)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            let ran = rt.block_on(async {
                let (tx, rx) = watch::channel(false);
                let mut term = signal(SignalKind::terminate())?;
                let mut int = signal(SignalKind::interrupt())?;
                tokio::spawn(async move {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                    let _ = tx.send(true);
                });
                cerebro_daemon::run(config, rx).await.map_err(anyhow::Error::from)
            });
            // A blocking task that has not ended (a training epoch, a run
            // of an imported graph) must not keep a stopped daemon alive:
            // what it would write, the next daemon redoes.
            rt.shutdown_timeout(SHUTDOWN_WAIT);
            // Such a task may still run on its thread: leave without the
            // exit-time destructors of ONNX Runtime and CUDA running under
            // it, where a crash would tell systemd a stop failed (and have
            // it restart a daemon asked to stop).
            let code = match ran {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("cerebrod: {e:#}");
                    1
                }
            };
            let _ = std::io::Write::flush(&mut std::io::stdout());
            // SAFETY: _exit ends the process at once; nothing after it runs,
            // and stderr, where the log goes, is unbuffered.
            unsafe { libc::_exit(code) }
        }
        Command::Score { model, version, source, key } => {
            let rows = rt.block_on(cerebro_daemon::score_relation(
                &config,
                &model,
                version,
                source.as_deref(),
                key.as_deref(),
            ))?;
            let csv = |s: &Option<String>| match s {
                Some(s) => format!("\"{}\"", s.replace('"', "\"\"")),
                None => String::new(),
            };
            let mut out = String::from("key,label,score\n");
            for r in rows {
                out.push_str(&format!("{},{},{:?}\n", csv(&r.key), csv(&r.label), r.score));
            }
            print!("{out}");
            Ok(())
        }
        Command::CheckConfig => {
            println!("{} is valid", cli.config.display());
            Ok(())
        }
    }
}
