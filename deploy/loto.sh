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

NYC=${CEREBRO_NYCFLIGHTS:-$ROOT/../shared/data/nycflights13}

setup_accuracy
if [[ " $* " == *" nycflights13 "* ]]; then
    [ -f "$NYC/flights.csv.gz" ] || die "nycflights13 not found in $NYC (set CEREBRO_NYCFLIGHTS)"
    load_nycflights "$ACCURACY_DB" "$NYC"
fi

step "Leave-one-task-out: the default selection, then the recommended one without the task's own versions"
"$ACCURACY_VENV/bin/python" "$ROOT/benchmarks/loto.py" "$ACCURACY_CONNINFO" "$ACCURACY_OUT" "$@"
echo "    results: $ACCURACY_OUT/loto.jsonl"
