//! Stopping one version's training: `cerebro.cancel(model, version)`, by the
//! role that queued it, ends it `cancelled` with who and when as its reason.

use std::time::Duration;

use cerebro_tests::{insert_telco_model, model_state, wait_for, wait_until_done, Daemon, Env};

use crate::{hostile_role_client, TRAIN_TIMEOUT};

fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map(|d| d.code().code().to_owned()).unwrap_or_else(|| e.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_owner_of_a_version_stops_its_training_and_the_reason_says_who_and_when() -> anyhow::Result<()> {
    let env = Env::from_env();
    let admin = env.connect().await?;
    let owner = hostile_role_client(&env, "rb_canceller").await?;
    admin.batch_execute("GRANT SELECT ON public.telco_churn TO rb_canceller").await?;
    let other = hostile_role_client(&env, "rb_bystander").await?;

    // Queued (no daemon yet): cancelled at once.
    let queued = insert_telco_model(&owner, "rb_cancel", r#"{"epochs": 2}"#).await?;
    let outcome: String = owner.query_one("SELECT cerebro.cancel('rb_cancel', $1)", &[&queued]).await?.get(0);
    assert_eq!(outcome, "cancelled");
    let (status, _, error) = model_state(&owner, "rb_cancel", queued).await?;
    assert_eq!(status, "cancelled");
    let error = error.unwrap_or_default();
    assert!(error.starts_with("cancelled by rb_canceller at 20"), "{error}");
    // Ended is ended.
    let e = owner.query_one("SELECT cerebro.cancel('rb_cancel', $1)", &[&queued]).await.expect_err("done");
    assert_eq!(sqlstate(&e), "55000");

    // Training: it stops after the epoch it is in.
    let training = insert_telco_model(&owner, "rb_cancel", r#"{"epochs": 2000, "patience": 0}"#).await?;
    let _daemon = Daemon::start(&env)?;
    wait_for(&owner, "rb_cancel", training, TRAIN_TIMEOUT, |s, epoch| s == "training" && epoch >= 1).await?;
    // A role that may not use the model does not see it; nor can it stop it.
    let e = other.query_one("SELECT cerebro.cancel('rb_cancel', $1)", &[&training]).await.expect_err("not theirs");
    assert_eq!(sqlstate(&e), "42704");
    let outcome: String = owner.query_one("SELECT cerebro.cancel('rb_cancel', $1)", &[&training]).await?.get(0);
    assert_eq!(outcome, "cancelling");
    let seen = wait_until_done(&owner, "rb_cancel", training, Duration::from_secs(120)).await?;
    assert_eq!(seen.last().map(String::as_str), Some("cancelled"), "{seen:?}");
    let (_, epoch, error) = model_state(&owner, "rb_cancel", training).await?;
    assert!(epoch < 2000, "it trained on to epoch {epoch}");
    let error = error.unwrap_or_default();
    assert!(error.starts_with("cancelled by rb_canceller at 20"), "{error}");
    let audited: i64 = admin
        .query_one(
            "SELECT count(*) FROM cerebro.audit_log WHERE action = 'cancel' AND model = 'rb_cancel' AND role_name = 'rb_canceller'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(audited, 2);
    Ok(())
}
