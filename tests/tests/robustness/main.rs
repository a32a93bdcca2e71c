//! Tier 5: Cerebro under real clients and real faults (issue 12): prepared
//! statements and the extended protocol from real drivers, PostgreSQL and
//! cerebrod restarted under load, and hostile input that must end as a row or
//! an ERROR with a SQLSTATE, never a crashed backend.
//!
//! Run by deploy/test.sh, one test at a time, on the end-to-end database,
//! after every other tier: some of these tests restart the cluster.

mod cancel;
mod hostile_input;
mod load;
mod prepared;
mod restarts;

use std::time::Duration;

use cerebro_tests::{wait_until_done, Daemon, Env};
use tokio_postgres::Client;

pub const TRAIN_TIMEOUT: Duration = Duration::from_secs(300);

/// The model the suite scores and derives from (trained once per database).
pub const MODEL: &str = "rb_churn";

/// A login role with no privileges beyond PUBLIC's, connected. Roles are the
/// cluster's: made if missing, never dropped.
pub async fn hostile_role_client(env: &Env, role: &str) -> anyhow::Result<Client> {
    let admin = env.connect().await?;
    admin
        .batch_execute(&format!(
            "DO $$ BEGIN CREATE ROLE {role}; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
             ALTER ROLE {role} LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB NOBYPASSRLS;"
        ))
        .await?;
    env.connect_as(role, &env.db).await
}

/// A daemon, and [`MODEL`] ready.
pub async fn scoring_model(env: &Env, db: &Client) -> anyhow::Result<Daemon> {
    let daemon = Daemon::start(env)?;
    let ready: i64 = db
        .query_one("SELECT count(*) FROM cerebro.models WHERE name = $1 AND status = 'ready'", &[&MODEL])
        .await?
        .get(0);
    if ready == 0 {
        db.execute(
            "INSERT INTO cerebro.models (name, source, target, key, options)
             VALUES ($1, 'telco_churn', 'churn', 'customer_id', '{\"epochs\": 3}')",
            &[&MODEL],
        )
        .await?;
        let version: i32 =
            db.query_one("SELECT max(version) FROM cerebro.models WHERE name = $1", &[&MODEL]).await?.get(0);
        let seen = wait_until_done(db, MODEL, version, TRAIN_TIMEOUT).await?;
        assert_eq!(seen.last().map(String::as_str), Some("ready"), "{seen:?}");
    }
    Ok(daemon)
}
