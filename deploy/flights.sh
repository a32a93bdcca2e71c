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
#   deploy/flights.sh joins           joins found from foreign keys (issue 17): the selection
#                                     above (hand-written joined view or not) against the same
#                                     grid on nyc.flight_facts with features joins(auto)
#   deploy/flights.sh reuse           reuse across iterations (issue 17): a selection on
#                                     nyc.flights_known, then the same selection on its
#                                     snapshot (parent_version); seconds from each INSERT to
#                                     its first epoch, and what cerebrod's snapshot cache served
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

if [ "${1:-}" = reuse ]; then
    name="flights_reuse_$(date +%s)"
    spec='model hidden = {[64, 32], [128, 64]}
          train  lr = {1e-3, 3e-3}, epochs = 1, patience = 0'
    # Seconds from the selection's INSERT (its transaction's start) to the
    # start of its first epoch: the earliest epoch's end less its length.
    first_epoch() {
        psql_as "$DB" -tAc "
SELECT round(extract(epoch FROM min(h.recorded_at - h.seconds * interval '1 second') - s.created_at)::numeric, 2)
FROM cerebro.selections s JOIN cerebro.model_versions m ON m.selection_id = s.id
JOIN cerebro.training_history h ON h.model_version_id = m.id
WHERE s.id = $1 GROUP BY s.created_at"
    }
    finish() {
        until [ "$(psql_as "$DB" -tAc "SELECT finished_at IS NOT NULL FROM cerebro.selections WHERE id = $1")" = t ]; do
            sleep 1
        done
    }
    step "A selection on nyc.flights_known ($name): it freezes the source, cerebrod reads the snapshot"
    started=$(date +%s.%N)
    psql_as "$DB" -q -c "INSERT INTO cerebro.models (name, source, target, key, spec)
        VALUES ('$name', 'nyc.flights_known', 'late', 'flight_id', \$\$$spec\$\$)"
    insert1=$(awk -v a="$(date +%s.%N)" -v b="$started" 'BEGIN { print a - b }')
    first=$(psql_as "$DB" -tAc "SELECT max(id) FROM cerebro.selections WHERE name = '$name'")
    finish "$first"
    parent=$(psql_as "$DB" -tAc "SELECT min(version) FROM cerebro.model_versions WHERE selection_id = $first")
    step "The same selection on version $parent's snapshot (parent_version)"
    started=$(date +%s.%N)
    psql_as "$DB" -q -c "INSERT INTO cerebro.models (name, parent_version, spec) VALUES ('$name', $parent, \$\$$spec\$\$)"
    insert2=$(awk -v a="$(date +%s.%N)" -v b="$started" 'BEGIN { print a - b }')
    second=$(psql_as "$DB" -tAc "SELECT max(id) FROM cerebro.selections WHERE name = '$name'")
    finish "$second"
    f1=$(first_epoch "$first")
    f2=$(first_epoch "$second")
    printf '\n%-44s %10s %18s\n' "" "INSERT, s" "to first epoch, s"
    printf '%-44s %10.2f %18.2f\n' "selection $first (freezes the source)" "$insert1" "$f1"
    printf '%-44s %10.2f %18.2f\n' "selection $second (on version $parent's snapshot)" "$insert2" "$f2"
    awk -v a="$f1" -v b="$f2" 'BEGIN { printf "    the second reached its first epoch %.1fx sooner\n", a / b }'
    psql_as "$DB" -c "SELECT id, snapshot_cache_hits AS cache_hits, pg_size_pretty(snapshot_cache_bytes) AS served,
        round(spent_seconds::numeric, 1) AS seconds FROM cerebro.selections WHERE id IN ($first, $second) ORDER BY id"
    exit 0
fi

if [ "${1:-}" = joins ]; then
    stamp=$(date +%s)
    grid='model  hidden = {[64, 32], [128, 64]}, dropout = {0, 0.1}
          train  split = ordered, lr = {1e-3, 3e-3}'
    step "The hand-written joined view, searched with and without (flights_hand_$stamp), and joins(auto) on nyc.flight_facts (flights_auto_$stamp)"
    started=$(date +%s)
    psql_as "$DB" -q -c "INSERT INTO cerebro.models (name, source, target, key, spec) VALUES ('flights_hand_$stamp',
        'nyc.flights_known', 'late', 'flight_id', \$\$source {nyc.flights_known, nyc.flights_joined}
        $grid\$\$)"
    hand=$(psql_as "$DB" -tAc "SELECT max(id) FROM cerebro.selections WHERE name = 'flights_hand_$stamp'")
    psql_as "$DB" -q -c "INSERT INTO cerebro.models (name, source, target, key, spec) VALUES ('flights_auto_$stamp',
        'nyc.flight_facts', 'late', 'flight_id', \$\$features joins(auto)
        $grid\$\$)"
    auto=$(psql_as "$DB" -tAc "SELECT max(id) FROM cerebro.selections WHERE name = 'flights_auto_$stamp'")
    for selection in "$hand" "$auto"; do
        until [ "$(psql_as "$DB" -tAc "SELECT finished_at IS NOT NULL FROM cerebro.selections WHERE id = $selection")" = t ]; do
            sleep 2
        done
    done
    echo "    both trained in $(( $(date +%s) - started )) s"
    psql_as "$DB" -c "
SELECT j->>'table' AS joined, j->>'on' AS on_columns, j->>'hop' AS hop, j->>'tuple_ratio' AS tuple_ratio,
       coalesce(j->>'why', 'searched: ' || jsonb_array_length(j->'columns') || ' columns') AS what
FROM cerebro.selections s, jsonb_array_elements((s.plan->'joins'->'kept') || (s.plan->'joins'->'pruned')) j
WHERE s.id = $auto"
    psql_as "$DB" -c "
SELECT l.selection, l.rank, l.version, left(l.source, 40) AS source, array_length(l.features, 1) AS features,
       l.triple->>'hidden' AS hidden, l.triple->>'lr' AS lr, round((l.metrics->>'auc')::numeric, 4) AS auc
FROM cerebro.leaderboard l WHERE l.selection IN ($hand, $auto) AND l.rank <= 3 ORDER BY l.selection, l.rank"
    psql_as "$DB" -c "
SELECT CASE l.selection WHEN $hand THEN 'hand-written joined view' ELSE 'joins(auto)' END AS selection,
       round((l.metrics->>'auc')::numeric, 4) AS best_auc
FROM cerebro.leaderboard l WHERE l.selection IN ($hand, $auto) AND l.rank = 1 ORDER BY l.selection"
    exit 0
fi

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
