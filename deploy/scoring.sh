#!/usr/bin/env bash
# Scoring benchmark: Cerebro's SQL scoring against a vectorised Python client
# (psycopg COPY, pandas, onnxruntime) and against the floor (the scan alone,
# ONNX Runtime alone), on a 345k-row copy of telco_churn, in one run; then
# pgbench -M prepared percentiles for one-row scoring. benchmarks/scoring.py
# says how.
#
#   deploy/scoring.sh
#   CEREBRO_SCORING_PGBENCH_SECONDS=20 deploy/scoring.sh   longer pgbench runs
#
# Runs in a database of its own, cerebro_scoring (kept between runs: the
# table and the model are made once), with a cerebrod of its own, stopped at
# the end; the cluster and the build are the demo's (set up if needed). The
# Python side goes into .cerebro/scoring-venv once.
source "$(dirname "$0")/lib.sh"

DB=cerebro_scoring
VENV=$STATE/scoring-venv
OUT=$STATE/scoring
PACKAGES=("onnxruntime==$ORT_VERSION" pandas==2.3.3 numpy==2.3.5 "psycopg[binary]==3.2.10")

ensure_venv "$VENV" "${PACKAGES[@]}"

setup_everything
ensure_database "$DB"
write_daemon_config scoring "$DB"
ensure_daemon scoring
trap 'stop_daemon scoring' EXIT
load_telco "$DB"

mkdir -p "$OUT"
step "Scoring: the floor, a Python client and Cerebro's SQL on the same rows; pgbench for one row"
"$VENV/bin/python" "$ROOT/benchmarks/scoring.py" "host=$RUN_DIR port=$PGPORT user=postgres dbname=$DB" "$OUT"
echo "    results: $OUT/scoring.jsonl"
