#!/usr/bin/env bash
# Accuracy on nycflights13: predicts arr_delay > 15 from what is known before
# departure, from the flights table alone and from flights joined with planes,
# weather (origin, hour) and airports (dest), and prints both validation AUCs.
#
#   deploy/flights.sh                 uses ../shared/data/nycflights13 (CEREBRO_NYCFLIGHTS to change)
#   CEREBRO_FLIGHTS_OPTIONS='{"hidden": [128, 64]}' deploy/flights.sh
#   deploy/flights.sh selection       model selection (issue 4): one INSERT whose FE dimension
#                                     includes and excludes the joins, validated on the last
#                                     fifth of the year (split = ordered), against the default
#                                     model on each source, validated the same way
#
# Runs in the demo's database (sets it up if needed); idempotent.
source "$(dirname "$0")/lib.sh"

DB=cerebro
SRC=${CEREBRO_NYCFLIGHTS:-$ROOT/../shared/data/nycflights13}
OPTIONS=${CEREBRO_FLIGHTS_OPTIONS:-'{}'}
[ -f "$SRC/flights.csv.gz" ] || die "nycflights13 not found in $SRC (set CEREBRO_NYCFLIGHTS)"

setup_everything
ensure_database "$DB"
write_daemon_config cerebrod "$DB"
ensure_daemon cerebrod

load_nycflights "$DB" "$SRC"

if [ "${1:-}" = selection ]; then
    step "Default models on each source, and a selection over both (validated on the last 20 % of flights)"
    psql_as "$DB" -q <<'SQL'
INSERT INTO cerebro.models (name, source, target, key, options) VALUES
    ('flights_only', 'nyc.flights_known', 'late', 'flight_id', '{"split": "ordered"}'),
    ('flights_joined', 'nyc.flights_joined', 'late', 'flight_id', '{"split": "ordered"}');
INSERT INTO cerebro.models (name, source, target, key, spec) VALUES ('flights_sel', 'nyc.flights_known', 'late',
    'flight_id', 'source {nyc.flights_known, nyc.flights_joined}
                 model  hidden = {[64, 32], [128, 64]}, dropout = {0, 0.1}
                 train  split = ordered, lr = {1e-3, 3e-3}');
SQL
    started=$(date +%s)
    for name in flights_only flights_joined; do
        version=$(psql_as "$DB" -tAc "SELECT max(version) FROM cerebro.models WHERE name = '$name'")
        wait_for_model "$DB" "$name" "$version" 3600
    done
    selection=$(psql_as "$DB" -tAc "SELECT max(id) FROM cerebro.selections WHERE name = 'flights_sel'")
    [ -n "$selection" ] || die "the selection was not queued (see the error above)"
    until [ "$(psql_as "$DB" -tAc "SELECT finished_at IS NOT NULL FROM cerebro.selections WHERE id = $selection")" = t ]; do
        sleep 2
    done
    echo "    all trained in $(( $(date +%s) - started )) s"
    psql_as "$DB" -c "
SELECT rank, version, status, source, triple->>'hidden' AS hidden, triple->>'dropout' AS dropout, triple->>'lr' AS lr,
       round((metrics->>'auc')::numeric, 4) AS auc, epochs_run, round(train_seconds::numeric, 1) AS seconds
FROM cerebro.leaderboard WHERE selection = $selection ORDER BY rank, version"
    psql_as "$DB" -c "
SELECT 'default model, ' || m.source AS model, round((m.metrics->>'auc')::numeric, 4) AS auc
FROM cerebro.models m
WHERE m.name IN ('flights_only', 'flights_joined')
  AND m.version = (SELECT max(version) FROM cerebro.models WHERE name = m.name)
UNION ALL
SELECT 'selection $selection winner, ' || source, round((metrics->>'auc')::numeric, 4)
FROM cerebro.leaderboard WHERE selection = $selection AND rank = 1"
    exit 0
fi

step "Training flights_only and flights_joined (options $OPTIONS)"
psql_as "$DB" -q <<SQL
INSERT INTO cerebro.models (name, source, target, key, options) VALUES
    ('flights_only', 'nyc.flights_known', 'late', 'flight_id', '$OPTIONS'),
    ('flights_joined', 'nyc.flights_joined', 'late', 'flight_id', '$OPTIONS');
SQL

for name in flights_only flights_joined; do
    version=$(psql_as "$DB" -tAc "SELECT max(version) FROM cerebro.models WHERE name = '$name'")
    wait_for_model "$DB" "$name" "$version" 3600
done

step "Validation AUC (80/20 seeded split); scikit-learn references from issue 3"
psql_as "$DB" -c "
SELECT m.name, m.version, array_length(m.features, 1) AS features, m.progress,
       round((m.metrics->>'auc')::numeric, 4) AS auc,
       CASE m.name WHEN 'flights_only' THEN 0.766 ELSE 0.777 END AS hist_gradient_boosting,
       CASE m.name WHEN 'flights_only' THEN 0.657 ELSE 0.702 END AS logistic_regression
FROM cerebro.models m
WHERE m.name IN ('flights_only', 'flights_joined')
  AND m.version = (SELECT max(version) FROM cerebro.models WHERE name = m.name)
ORDER BY m.name DESC"
