//! Tier 4: hostile roles and local users replay every attack of the security
//! review (issue 11) against the real parts: PostgreSQL 15 with the release
//! extension, cerebrod processes, the socket. Each test asserts the attack
//! fails with a proper error and leaves the attacker as it was.
//!
//! Run by deploy/test.sh, one test at a time, on the end-to-end database.
//! Roles are the cluster's: tests create theirs if missing and never drop
//! them, and put them back to NOSUPERUSER before they start.

mod daemon;
mod extension;
mod ipc;

use std::time::Duration;

use cerebro_tests::Env;
use tokio_postgres::Client;

pub const TRAIN_TIMEOUT: Duration = Duration::from_secs(300);

/// A login role with only what PUBLIC has (and SELECT on telco_churn when
/// `telco`), connected. A superuser makes it; the role is reset first.
pub async fn hostile_role(env: &Env, role: &str, telco: bool) -> anyhow::Result<Client> {
    let admin = env.connect().await?;
    admin
        .batch_execute(&format!(
            "DO $$ BEGIN CREATE ROLE {role}; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
             ALTER ROLE {role} LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB NOBYPASSRLS;
             ALTER ROLE {role} RESET ALL;"
        ))
        .await?;
    if telco {
        admin.batch_execute(&format!("GRANT SELECT ON public.telco_churn TO {role}")).await?;
    }
    env.connect_as(role, &env.db).await
}

/// Whether `role` is a superuser now.
pub async fn is_superuser(env: &Env, role: &str) -> anyhow::Result<bool> {
    let admin = env.connect().await?;
    Ok(admin.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&role]).await?.get(0))
}

/// The SQLSTATE and message of a failed statement.
pub fn db_error(e: &tokio_postgres::Error) -> (String, String) {
    match e.as_db_error() {
        Some(d) => (d.code().code().to_owned(), d.message().to_owned()),
        None => (String::new(), e.to_string()),
    }
}
