#!/usr/bin/env bash
# Cerebro's demo: sets everything up (idempotently), trains a churn model with
# INSERT INTO cerebro.models and scores customers with SELECT.
#
#   deploy/demo.sh             set up, train (once), score
#   CEREBRO_DEMO_RETRAIN=1 deploy/demo.sh   train a new version even if one is ready
source "$(dirname "$0")/lib.sh"

DB=cerebro
setup_everything
ensure_database "$DB"
write_daemon_config cerebrod "$DB"
ensure_daemon cerebrod
load_telco "$DB"

ready=$(psql_as "$DB" -tAc "SELECT count(*) FROM cerebro.models WHERE name = 'churn' AND status = 'ready'")
if [ "$ready" -gt 0 ] && [ -z "${CEREBRO_DEMO_RETRAIN:-}" ]; then
    skip "training (churn is ready; CEREBRO_DEMO_RETRAIN=1 trains a new version)"
else
    step "Training: INSERT INTO cerebro.models"
    psql_as "$DB" -q <<'SQL'
INSERT INTO cerebro.models (name, source, target, key, options)
VALUES ('churn', 'telco_churn', 'churn', 'customer_id', '{"hidden": [64, 32], "epochs": 40}');
SQL
fi

version=$(psql_as "$DB" -tAc "SELECT max(version) FROM cerebro.models WHERE name = 'churn'")
wait_for_model "$DB" churn "$version" 600

step "Validation metrics of churn v$version"
psql_as "$DB" -c "SELECT name, version, status, progress,
       round((metrics->>'auc')::numeric, 4) AS auc,
       round((metrics->>'accuracy')::numeric, 4) AS accuracy,
       round((metrics->>'log_loss')::numeric, 4) AS log_loss
FROM cerebro.models WHERE name = 'churn' AND version = $version"

step "Scoring with SELECT: the 10 customers most likely to churn"
psql_as "$DB" -c "SELECT p.key AS customer_id, p.label AS predicted, round(p.score::numeric, 3) AS p_churn,
       t.churn AS actual, t.contract, t.tenure
FROM cerebro.predictions p JOIN telco_churn t ON t.customer_id = p.key::int
WHERE p.model = 'churn'
ORDER BY p.score DESC, p.key LIMIT 10"

psql_as "$DB" -c "SELECT label AS predicted, count(*) AS customers,
       round(avg(score)::numeric, 3) AS mean_p_churn
FROM cerebro.predictions WHERE model = 'churn' GROUP BY label ORDER BY label"

step "Why: what matters to churn v$version, the likeliest churner's reasons, and rules that mimic the model"
psql_as "$DB" -c "SELECT i.rank, i.column_name, round(i.importance::numeric, 3) AS share_of_auc_drop
FROM cerebro.model_importance i JOIN cerebro.model_versions m ON m.id = i.model_version_id
WHERE m.name = 'churn' AND m.version = $version AND i.rank <= 5 ORDER BY i.rank"

psql_as "$DB" -c "SELECT p.key AS customer_id, round(p.score::numeric, 3) AS p_churn,
       round((p.explanation->>'baseline')::numeric, 3) AS typical_p,
       c->>'column' AS reason, c->>'value' AS value, round((c->>'contribution')::numeric, 3) AS contribution
FROM cerebro.predictions p, jsonb_array_elements(p.explanation->'contributions') c
WHERE p.model = 'churn' AND p.explain AND p.top_k = 3
  AND p.key = (SELECT key FROM cerebro.predictions WHERE model = 'churn' ORDER BY score DESC, key LIMIT 1)"

psql_as "$DB" -c "SELECT round((surrogate->>'fidelity')::numeric, 3) AS surrogate_agreement_with_the_model
FROM cerebro.model_versions WHERE name = 'churn' AND version = $version"
psql_as "$DB" -c "SELECT rule, prediction, support FROM cerebro.surrogate_rules('churn', $version)"

cat <<MSG

Cerebro is running.
  Connect:  psql -h $RUN_DIR -p $PGPORT -U postgres $DB
  Logs:     $LOG_DIR/cerebrod.log, $LOG_DIR/postgresql.log
  Stop:     deploy/stop.sh      (deploy/stop.sh --wipe also deletes the cluster and its models)
MSG
