#!/usr/bin/env bash
# Explanation benchmark: per-row integrated gradients through
# cerebro.predictions (WHERE ... AND explain) against the same method
# written with PyTorch autograd on the exported weights, on telco_churn's
# rows, same steps and baseline, 2 threads on both sides, in one run.
# benchmarks/explain.py says how.
#
#   deploy/explain.sh
#
# Runs in a database of its own, cerebro_explain (the model is trained
# once and kept), with a cerebrod of its own (scoring_threads = 2), stopped
# at the end; the cluster and the build are the demo's (set up if needed).
# PyTorch (from PyPI, about 5 GB) and the client's packages go into
# .cerebro/bench-venv once, the engine benchmark's venv.
source "$(dirname "$0")/lib.sh"

DB=cerebro_explain
VENV=$STATE/bench-venv
OUT=$STATE/explain
PACKAGES=(torch==2.15.0 numpy pandas==2.3.3 "psycopg[binary]==3.2.10" "onnx==$ONNX_VERSION")

ensure_venv "$VENV" "${PACKAGES[@]}"

setup_everything
ensure_database "$DB"
write_daemon_config explain "$DB"
echo "scoring_threads = 2" >>"$STATE/explain.toml"
ensure_daemon explain
trap 'stop_daemon explain' EXIT
load_telco "$DB"

mkdir -p "$OUT"
step "Explanations: PyTorch autograd, a Python client around it, and Cerebro's SQL on the same rows"
"$VENV/bin/python" "$ROOT/benchmarks/explain.py" "host=$RUN_DIR port=$PGPORT user=postgres dbname=$DB" "$OUT"
echo "    results: $OUT/explain.jsonl"
