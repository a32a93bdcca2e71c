"""Explanation benchmark: per-row attributions through SQL against PyTorch.

On telco_churn's 7,043 rows, with a churn model trained once (hidden
[64, 32], as the scoring benchmark's), one run measures integrated
gradients over STEPS midpoints from the same baseline row:

  (a) PyTorch autograd alone: the network rebuilt from the exported ONNX
      file's weights, the rows already encoded as tensors, batches of
      BATCH_ROWS rows times STEPS points, 2 threads (torch.set_num_threads);
  (b) the Python pipeline a user writes around it: psycopg COPY into
      pandas, the rows encoded with the version's fitted pipeline (read from
      cerebro.model_versions), then (a), then each column's contribution;
  (c) Cerebro: SELECT count(*), count(explanation) FROM cerebro.predictions
      WHERE ... AND explain, every row's explanation built as jsonb (and,
      apart, the same query without reading the explanation column, which
      builds no jsonb), cerebrod's scoring_threads = 2;
  and one row explained by key with pgbench -M prepared (1 client, 5 s),
  in the backend and with cerebro.score_in_backend off.

Every timed part runs REPEATS times; the median counts. It checks that
both sides' contributions agree and that each row's add up to its score,
and prints rows/s and ratios.

    python benchmarks/explain.py CONNINFO OUT_DIR

deploy/explain.sh sets everything up and runs it.
"""

import json
import os
import sys

import numpy as np
import onnx
import pandas as pd
import psycopg
import torch
from onnx import numpy_helper

from common import copy_frame, median_seconds, pgbench, train_once

STEPS = 32
BATCH_ROWS = 256
THREADS = 2
REPEATS = 3
MODEL = "bench_churn"
TABLE = "telco_churn"
NULL_CATEGORY = "\x01NULL"


def encoder_width(encoder):
    kind = encoder["kind"]
    if kind == "numeric":
        return 1 + int(encoder["null_indicator"])
    if kind == "ple":
        return len(encoder["edges"]) - 1 + int(encoder["null_indicator"])
    if kind == "categorical":
        return len(encoder["vocabulary"])
    sys.exit(f"this benchmark encodes standardised, PLE and one-hot columns only, not {kind}")


def encode(pipeline, frame):
    """The network's input matrix for `frame`, as the fitted pipeline
    encodes it (features.rs): standardised numbers or piecewise-linear bins
    with a NULL indicator, one-hot categories (NULL as its own category)."""
    parts = []
    for feature in pipeline["features"]:
        encoder, column = feature["encoder"], frame[feature["name"]]
        if encoder["kind"] in ("numeric", "ple"):
            values = pd.to_numeric(column, errors="coerce").to_numpy(np.float32, na_value=np.nan)
            missing = ~np.isfinite(values)
            if encoder["kind"] == "numeric":
                z = np.where(missing, 0.0, (values - np.float32(encoder["mean"])) / np.float32(encoder["std"]))
                parts.append(z.astype(np.float32).reshape(-1, 1))
            else:
                edges = np.array(encoder["edges"], np.float32)
                bins = np.clip((values[:, None] - edges[None, :-1]) / (edges[None, 1:] - edges[None, :-1]), 0.0, 1.0)
                parts.append(np.where(missing[:, None], 0.0, bins).astype(np.float32))
            if encoder["null_indicator"]:
                parts.append(missing.astype(np.float32).reshape(-1, 1))
        else:
            vocabulary = encoder["vocabulary"]
            codes = pd.Categorical(column.fillna(NULL_CATEGORY), categories=vocabulary).codes
            one_hot = np.zeros((len(frame), len(vocabulary)), np.float32)
            seen = codes >= 0
            one_hot[np.nonzero(seen)[0], codes[seen]] = 1.0
            parts.append(one_hot)
    return np.hstack(parts)


def baseline_frame(pipeline):
    row = {}
    for feature in pipeline["features"]:
        typical = feature["typical"]
        row[feature["name"]] = [typical.get("median", typical.get("mode"))]
    return pd.DataFrame(row)


def network(onnx_bytes, options):
    """The exported MLP as torch layers, its weights read from the file."""
    if options.get("norm", "none") != "none" or options.get("residual_blocks", 0) or options.get("members", 1) != 1:
        sys.exit("this benchmark rebuilds plain MLPs only")
    graph = onnx.load_from_string(onnx_bytes).graph
    # Initializers are named _cerebro/<kind>_<n>, in the order the graph uses them.
    of_kind = lambda kind: [numpy_helper.to_array(t) for t in graph.initializer
                            if t.name.rsplit("_", 1)[0] == f"_cerebro/{kind}"]
    layers = []
    for w, b in zip(of_kind("weight"), of_kind("bias")):
        linear = torch.nn.Linear(w.shape[1], w.shape[0])
        linear.weight.data = torch.from_numpy(w.copy())
        linear.bias.data = torch.from_numpy(b.copy())
        layers += [linear, torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1]).eval()


def integrated_gradients(net, x, x0, steps=STEPS):
    """Each input's contribution for every row of `x` against `x0`:
    (x - x0) times the gradient of the churn probability averaged over
    `steps` midpoints of the straight path, by autograd, batch by batch."""
    alphas = ((torch.arange(steps, dtype=torch.float32) + 0.5) / steps).view(1, -1, 1)
    rows = max(1, BATCH_ROWS * STEPS // steps)
    out = []
    for start in range(0, len(x), rows):
        xb = x[start : start + rows]
        path = (x0 + alphas * (xb - x0).unsqueeze(1)).reshape(-1, x.shape[1]).requires_grad_(True)
        probability = torch.sigmoid(net(path)).sum()
        (grad,) = torch.autograd.grad(probability, path)
        out.append((xb - x0) * grad.view(len(xb), steps, -1).mean(1))
    return torch.cat(out)


def completeness_gaps(net, x, x0, attributions):
    """How far each row's contributions add up from its probability minus
    the baseline's."""
    with torch.no_grad():
        p, p0 = torch.sigmoid(net(x)).squeeze(1), torch.sigmoid(net(x0)).squeeze(1)
    return (attributions.sum(1) - (p - p0)).abs().numpy()


def by_column(pipeline, attributions):
    spans, at = [], 0
    for feature in pipeline["features"]:
        width = encoder_width(feature["encoder"])
        spans.append((at, at + width))
        at += width
    return np.stack([attributions[:, a:b].sum(1) for a, b in spans], axis=1)


def main():
    conninfo, out_dir = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(THREADS)
    conn = psycopg.connect(conninfo, autocommit=True)
    options = '{"hidden": [64, 32], "epochs": 5}'
    version = train_once(conn, MODEL, TABLE, "customer_id", options, "hidden [64, 32], 5 epochs")
    with conn.cursor() as cur:
        cur.execute(
            "SELECT pipeline, options, cerebro.export_onnx(name, version), key_column FROM cerebro.model_versions "
            "WHERE name = %s AND version = %s",
            (MODEL, version),
        )
        pipeline, options, onnx_bytes, key = cur.fetchone()
        cur.execute(f"SELECT count(*) FROM {TABLE}")
        rows = cur.fetchone()[0]
    names = [f["name"] for f in pipeline["features"]]
    net = network(bytes(onnx_bytes), options)
    print(f"    {rows:,} rows, {len(names)} columns, model {MODEL} v{version}, {STEPS} steps", flush=True)

    text = [f["name"] for f in pipeline["features"] if f["encoder"]["kind"] == "categorical"] + [key]
    read_rows = lambda: copy_frame(conn, TABLE, [key] + names, text)

    x0 = torch.from_numpy(encode(pipeline, baseline_frame(pipeline)))
    frame = read_rows()
    x = torch.from_numpy(encode(pipeline, frame))
    results = {"torch_alone": median_seconds(lambda: integrated_gradients(net, x, x0), REPEATS)}
    # How faithful evenly spaced points are, and what more of them cost.
    faithful = []
    for steps in (STEPS, 4 * STEPS, 16 * STEPS):
        if steps == STEPS:
            seconds = results["torch_alone"]
        else:
            seconds = median_seconds(lambda: integrated_gradients(net, x, x0, steps), REPEATS)
        gaps = completeness_gaps(net, x, x0, integrated_gradients(net, x, x0, steps))
        faithful.append((steps, seconds, float(gaps.max()), float(np.mean(gaps > 1e-3))))

    python = {}
    def client():
        f = read_rows()
        encoded = torch.from_numpy(encode(pipeline, f))
        python["keys"] = f[key].to_numpy()
        python["columns"] = by_column(pipeline, integrated_gradients(net, encoded, x0).numpy())
    results["python"] = median_seconds(client, REPEATS)

    where = f"model = '{MODEL}' AND version = {version} AND explain"
    # count(explanation) reads the column, so that the backend builds every
    # row's jsonb, as a query that reads the explanations does; the second
    # query leaves it out (the explanations are computed and sent all the
    # same, but no jsonb is made), to show what the jsonb costs.
    def sql(what):
        def run():
            with conn.cursor() as cur:
                cur.execute(f"SELECT count(*), {what} FROM cerebro.predictions WHERE {where}")
                n, built = cur.fetchone()
                assert n == rows, f"cerebro.predictions gave {n} rows, not {rows}"
                assert what != "count(explanation)" or built == rows, f"{built} explanations of {rows} rows"
        return run
    results["sql"] = median_seconds(sql("count(explanation)"), REPEATS)
    results["sql_unread"] = median_seconds(sql("sum(score)"), REPEATS)

    # The same contributions, and complete (checks, not timings).
    with conn.cursor() as cur:
        cur.execute(f"SELECT key, score, explanation FROM cerebro.predictions WHERE {where} AND top_k = {len(names)}")
        explained = {k: (s, e) for k, s, e in cur.fetchall()}
    worst_gap, apart = 0.0, []
    for k, row in zip(python["keys"], python["columns"]):
        score, e = explained[k]
        listed = {c["column"]: c["contribution"] for c in e["contributions"]}
        worst_gap = max(worst_gap, abs(e["baseline"] + sum(listed.values()) + e["rest"] - score))
        apart.append(max(abs(listed[n] - v) for n, v in zip(names, row)))
    apart = np.array(apart)

    print(f"\n{'explanations, ' + format(rows, ',') + ' rows, ' + str(STEPS) + ' steps':50} {'seconds':>8} {'rows/s':>9}  ratio")
    table = [
        ("(a) PyTorch autograd alone, encoded tensors", results["torch_alone"], ""),
        ("(b) Python: COPY, pandas, PyTorch autograd", results["python"], ""),
        ("(c) SQL: cerebro.predictions ... AND explain", results["sql"],
         f"{results['torch_alone'] / results['sql']:.2f}x (a), {results['python'] / results['sql']:.2f}x (b)"),
        ("    the same, explanation not read (no jsonb)", results["sql_unread"],
         f"{results['torch_alone'] / results['sql_unread']:.2f}x (a), {results['python'] / results['sql_unread']:.2f}x (b)"),
    ]
    lines = []
    for label, seconds, ratio in table:
        print(f"{label:50} {seconds:>8.3f} {rows / seconds:>9,.0f}  {ratio}")
        lines.append({"what": label, "seconds": seconds, "rows_per_s": rows / seconds})
    print(f"(c) completeness: every row's baseline + contributions + rest within {worst_gap:.1e} of its score; "
          f"contributions apart from PyTorch's at {STEPS} steps: median {np.median(apart):.1e}, worst {apart.max():.1e}")
    print(f"\n{'PyTorch autograd, evenly spaced points':50} {'seconds':>8} {'worst gap':>10} {'rows > 1e-3':>12}  Cerebro (c) faster by")
    for steps, seconds, worst, share in faithful:
        print(f"{str(steps) + ' midpoints':50} {seconds:>8.3f} {worst:>10.1e} {share:>12.1%}  {seconds / results['sql']:.2f}x")
        lines.append({"what": f"pytorch {steps} midpoints", "seconds": seconds, "worst_gap": worst, "rows_beyond_1e-3": share})
    # One row explained by key, as an application asks: in the backend (the
    # default), and with every row sent to cerebrod.
    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    args = ["-h", params["host"], "-p", str(params["port"]), "-U", params["user"], params["dbname"]]
    script = (f"\\set id random(1, {rows})\n"
              f"SELECT explanation FROM cerebro.predictions WHERE model = '{MODEL}' AND explain AND key = :id::text;\n")
    print(f"\n{'one row by key, explain, pgbench -M prepared, 5 s':50} {'p50 µs':>8} {'p99 µs':>8} {'calls/s':>9}")
    for label, settings in (("in the backend", ""), ("cerebro.score_in_backend off", "-c cerebro.score_in_backend=off")):
        r = pgbench(args, script, 1, out_dir, "explain_" + label.split()[-1], 5, settings)
        print(f"{label:50} {r['p50_us']:>8,} {r['p99_us']:>8,} {r['calls_per_s']:>9,.0f}", flush=True)
        lines.append({**r, "what": f"one row by key, explain, {label}"})
    with open(os.path.join(out_dir, "explain.jsonl"), "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
