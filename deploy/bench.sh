#!/usr/bin/env bash
# Engine benchmark: Cerebro's engine against PyTorch CPU on the same data,
# initial weights and thread count, measured in one run; prints ratios.
#
#   deploy/bench.sh            2 threads on both sides (CEREBRO_BENCH_THREADS to change)
#   CEREBRO_BENCH_ONLY=selection deploy/bench.sh   only the model selection benchmark (engine: the other)
#
# Set-up is idempotent: PyTorch (from PyPI) goes into .cerebro/bench-venv once.
source "$(dirname "$0")/lib.sh"

THREADS=${CEREBRO_BENCH_THREADS:-2}
VENV=$STATE/bench-venv
DATA=$STATE/bench
TORCH_VERSION=2.15.0

ensure_rust
if "$VENV/bin/python" -c "import torch, numpy; assert torch.__version__.startswith('$TORCH_VERSION')" 2>/dev/null; then
    skip "PyTorch $TORCH_VERSION in $VENV"
else
    step "Installing PyTorch $TORCH_VERSION and numpy into $VENV (about 5 GB, once)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet "torch==$TORCH_VERSION" numpy
fi

ONLY=${CEREBRO_BENCH_ONLY:-}
mkdir -p "$DATA"
if [ "$ONLY" != selection ]; then
    step "Cerebro engine (cargo bench), $THREADS thread(s)"
    (cd "$ROOT" && cargo bench --quiet -p cerebro-daemon --bench engine -- "$DATA" "$THREADS") | grep '^{' >"$DATA/cerebro.jsonl"
    step "PyTorch $TORCH_VERSION CPU, $THREADS thread(s)"
    "$VENV/bin/python" "$ROOT/daemon/benches/torch_baseline.py" "$DATA" "$THREADS" >"$DATA/pytorch.jsonl"

    python3 - "$DATA" "$THREADS" <<'PY'
import json, sys
d, threads = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for f in ("cerebro", "pytorch") for l in open(f"{d}/{f}.jsonl")]
get = lambda side, w: next((r for r in rows if r["side"] == side and r["workload"] == w), None)
print(f"\n{'workload':40} {'cerebro samples/s':>18} {'pytorch samples/s':>18} {'ratio':>7}  (PyTorch threads: {threads})")
for w, label, base in [
    ("a_mlp_64_256_256_1", "(a) MLP 64-256-256-1, batch 512, Adam", "a_mlp_64_256_256_1"),
    ("b_mlp_64_32_1", "(b) MLP 64-32-1", "b_mlp_64_32_1"),
    ("c_k8_mlp_64_32_1", "(c) K=8 of (b) vs one after another", "c_k8_mlp_64_32_1"),
    ("c_k8_mlp_64_32_1", "(c) K=8 of (b) vs hand-fused (bmm)", "c_k8_mlp_64_32_1_fused"),
    ("c_k32_mlp_64_32_1", "(c) K=32 of (b) vs one after another", "c_k32_mlp_64_32_1"),
    ("c_k32_mlp_64_32_1", "(c) K=32 of (b) vs hand-fused (bmm)", "c_k32_mlp_64_32_1_fused"),
    ("inference_b8192_mlp_64_256_256_1", "inference, batch 8192, MLP (a)", "inference_b8192_mlp_64_256_256_1"),
]:
    c, p = get("cerebro", w), get("pytorch", base)
    print(f"{label:40} {c['samples_per_s']:>18,.0f} {p['samples_per_s']:>18,.0f} {p['seconds'] / c['seconds']:>6.2f}x")
c, p = get("cerebro", "peak_rss_mib"), get("pytorch", "peak_rss_mib")
print(f"{'peak memory (MiB)':40} {c['value']:>18,.0f} {p['value']:>18,.0f}")
PY
fi

if [ "$ONLY" != engine ]; then
    step "Model selection: 16 candidates on telco_churn, Cerebro fused and one after another, $THREADS thread(s)"
    (cd "$ROOT" && cargo bench --quiet -p cerebro-daemon --bench selection -- "$DATA" "$THREADS") | grep '^{' \
        >"$DATA/selection_cerebro.jsonl"
    step "Model selection: the same 16 with PyTorch $TORCH_VERSION, one after another, $THREADS thread(s)"
    "$VENV/bin/python" "$ROOT/daemon/benches/torch_selection.py" "$DATA" "$THREADS" >"$DATA/selection_pytorch.jsonl"
    python3 - "$DATA" <<'PY'
import json, sys
d = sys.argv[1]
rows = {(r["side"], r["workload"]): r for f in ("selection_cerebro", "selection_pytorch")
        for r in map(json.loads, open(f"{d}/{f}.jsonl"))}
fused = rows[("cerebro", "selection16_fused")]
print(f"\n{'16 candidates on telco_churn, 20 epochs':48} {'seconds':>9} {'best AUC':>9} {'fused is':>9}")
for key, label in [(("cerebro", "selection16_fused"), "Cerebro, fused (2 stacks of 8)"),
                   (("cerebro", "selection16_sequential"), "Cerebro, one after another"),
                   (("pytorch", "selection16_sequential"), "PyTorch, one after another")]:
    r = rows[key]
    print(f"{label:48} {r['seconds']:>9.2f} {r['best_auc']:>9.4f} {r['seconds'] / fused['seconds']:>8.2f}x")
PY
fi
