"""Scoring benchmark: Cerebro's SQL scoring against what a user does today.

On a 345k-row copy of telco_churn (49 copies, a new integer key `id`), with
a churn model trained once (hidden [64, 32], as the demo's), one run
measures:

  (a) the floor: the scan of the feature columns alone (EXPLAIN ANALYZE's
      execution time), and ONNX Runtime alone on ready arrays (the exported
      file, batches of 10k, every core);
  (b) the vectorised Python pipeline a competent user writes: psycopg COPY
      into pandas, the arrays built, onnxruntime on the exported file in
      batches of 10k;
  (c) Cerebro's SQL scoring: every row through cerebro.predictions, read by
      an aggregate and written by INSERT ... SELECT;
  for writing scores into a table, the same again with the write: (a)
      PostgreSQL's own INSERT ... SELECT of as many rows of the same shape
      (the key, a constant label and score), unscored; (b) the Python
      pipeline that then COPYs its scores back into the table;
  (d) latency percentiles with pgbench -M prepared at 1 and 8 clients: the
      plain lookup of one row (the floor), cerebro.predict on one row (as
      it runs by default, scored in the backend, and with
      cerebro.score_in_backend off, each row sent to cerebrod), and by-key
      predictions (over the scored table, named, and over the model's own
      source, as `WHERE model = ... AND key = ...` reads).

Every timed part runs REPEATS times; the median counts. Prints one table of
rows/s and ratios, one of percentiles, and writes both as JSON lines.

    python benchmarks/scoring.py CONNINFO OUT_DIR

deploy/scoring.sh sets everything up and runs it.
"""

import json
import os
import statistics
import sys

import numpy as np
import onnxruntime as ort
import pandas as pd
import psycopg

from common import copy_frame, median_seconds, pgbench, train_once

COPIES = 49
BATCH = 10_000
REPEATS = 3
MODEL = "bench_churn"
TABLE = "scoring_bench"
# What the exported graph takes for a NULL category (shared/src/spec.rs).
NULL_CATEGORY = "\x01NULL"
PGBENCH_SECONDS = int(os.environ.get("CEREBRO_SCORING_PGBENCH_SECONDS", "8"))


def prepare(conn):
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM telco_churn")
        base = cur.fetchone()[0]
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (TABLE,))
        if cur.fetchone()[0]:
            cur.execute(f"SELECT count(*) FROM {TABLE}")
            if cur.fetchone()[0] == base * COPIES:
                print(f"    {TABLE}: {base * COPIES:,} rows, kept", flush=True)
                return
            cur.execute(f"DROP TABLE {TABLE}")
        print(f"    {TABLE}: {COPIES} copies of telco_churn", flush=True)
        cur.execute(
            f"""CREATE TABLE {TABLE} AS
                SELECT row_number() OVER ()::integer AS id, t.*
                FROM generate_series(1, {COPIES}), telco_churn t"""
        )
        cur.execute(f"ALTER TABLE {TABLE} ADD PRIMARY KEY (id)")
        cur.execute(f"VACUUM ANALYZE {TABLE}")


def text_inputs(session):
    return [i.name for i in session.get_inputs() if i.type == "tensor(string)"]


def feeds(session, frame):
    """The exported graph's inputs for all of `frame`'s rows, converted once:
    [n, 1] float32 for a numeric column (NaN for NULL), [n, 1] strings for
    a categorical one (NULL as the graph's NULL category)."""
    out = {}
    for i in session.get_inputs():
        column = frame[i.name]
        if i.type == "tensor(string)":
            out[i.name] = column.fillna(NULL_CATEGORY).to_numpy(dtype=object).reshape(-1, 1)
        else:
            out[i.name] = column.to_numpy(np.float32, na_value=np.nan).reshape(-1, 1)
    return out


def batches(arrays, rows):
    for start in range(0, rows, BATCH):
        yield {name: a[start : start + BATCH] for name, a in arrays.items()}


def copy_session_frame(conn, session):
    """Every row of the table's key and feature columns, by COPY into pandas."""
    columns = ["id"] + [i.name for i in session.get_inputs()]
    return copy_frame(conn, TABLE, columns, text_inputs(session))


def churn_probability(scores):
    """The positive class's probability from the graph's first output."""
    return scores[:, -1] if scores.ndim == 2 else scores


def score_in_batches(session, frame):
    first_output = [session.get_outputs()[0].name]
    return np.concatenate([session.run(first_output, f)[0] for f in batches(feeds(session, frame), len(frame))])


def main():
    conninfo, out_dir = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    conn = psycopg.connect(conninfo, autocommit=True)
    prepare(conn)
    options = '{"hidden": [64, 32], "epochs": 5}'
    version = train_once(conn, MODEL, "telco_churn", "customer_id", options, "hidden [64, 32], 5 epochs")
    with conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {TABLE}")
        rows = cur.fetchone()[0]
        cur.execute("SELECT cerebro.export_onnx(%s, %s)", (MODEL, version))
        onnx_bytes = cur.fetchone()[0]
        cur.execute("SELECT class_labels FROM cerebro.model_versions WHERE name = %s AND version = %s",
                    (MODEL, version))
        class_labels = cur.fetchone()[0]
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count()
    session = ort.InferenceSession(bytes(onnx_bytes), options, providers=["CPUExecutionProvider"])
    features = [i.name for i in session.get_inputs()]
    assert session.get_outputs()[0].name in ("probability", "probabilities", "value")
    print(f"    {rows:,} rows, {len(features)} features, model {MODEL} v{version}", flush=True)

    results = {}
    # (a) The floor.
    def scan():
        with conn.cursor() as cur:
            cur.execute(f"EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) SELECT {', '.join(features)} FROM {TABLE}")
            return cur.fetchone()[0][0]["Execution Time"] / 1000.0
    results["scan"] = statistics.median(scan() for _ in range(REPEATS))
    frame = copy_session_frame(conn, session)
    ready = list(batches(feeds(session, frame), len(frame)))
    first_output = [session.get_outputs()[0].name]
    results["ort_alone"] = median_seconds(lambda: [session.run(first_output, f) for f in ready], REPEATS)

    # (b) The Python client pipeline, end to end.
    python_scores = {}
    def client():
        f = copy_session_frame(conn, session)
        python_scores["scores"] = score_in_batches(session, f)
        python_scores["ids"] = f["id"].to_numpy()
    results["python"] = median_seconds(client, REPEATS)

    # (c) Cerebro's SQL scoring.
    where = f"model = '{MODEL}' AND version = {version} AND source = '{TABLE}' AND key_column = 'id'"
    def sql_read():
        with conn.cursor() as cur:
            cur.execute(f"SELECT count(*), sum(score) FROM cerebro.predictions WHERE {where}")
            n, _ = cur.fetchone()
            assert n == rows, f"cerebro.predictions gave {n} rows, not {rows}"
    results["sql"] = median_seconds(sql_read, REPEATS)
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS scoring_bench_scored")
        cur.execute("CREATE UNLOGGED TABLE scoring_bench_scored (id text, label text, score float8)")
    # Each write goes into the emptied table; emptying it is not timed.
    def empty_scored():
        with conn.cursor() as cur:
            cur.execute("TRUNCATE scoring_bench_scored")
    def sql_insert():
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO scoring_bench_scored SELECT key, label, score FROM cerebro.predictions WHERE {where}")
    results["sql_insert"] = median_seconds(sql_insert, REPEATS, empty_scored)
    # Writing: PostgreSQL's own INSERT of as many rows of the same shape,
    # and the Python pipeline storing its scores with COPY.
    def write_floor():
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO scoring_bench_scored SELECT id::text, 'No', 0.5::float8 FROM {TABLE}")
    results["write_floor"] = median_seconds(write_floor, REPEATS, empty_scored)
    labels = np.array(class_labels, dtype=object)
    def client_store():
        f = copy_session_frame(conn, session)
        scores = score_in_batches(session, f)
        prob = churn_probability(scores)
        out = pd.DataFrame({"id": f["id"].to_numpy(), "label": labels[(prob >= 0.5).astype(int)], "score": prob})
        with conn.cursor() as cur:
            with cur.copy("COPY scoring_bench_scored (id, label, score) FROM STDIN") as copy:
                copy.write(out.to_csv(sep="\t", header=False, index=False))
    results["python_store"] = median_seconds(client_store, REPEATS, empty_scored)
    # The check below reads the table SQL wrote.
    empty_scored()
    sql_insert()
    # The same scores as the Python pipeline's (a check, not a timing).
    with conn.cursor() as cur:
        cur.execute("SELECT id::integer, score FROM scoring_bench_scored ORDER BY id::integer")
        sql_scores = np.array([s for _, s in cur.fetchall()])
    order = np.argsort(python_scores["ids"])
    prob = churn_probability(python_scores["scores"][order])
    worst = float(np.max(np.abs(prob - sql_scores)))
    assert worst < 1e-5, f"SQL and Python scores differ by {worst}"

    lines = []
    floor = results["scan"] + results["ort_alone"]
    table = [
        ("(a) scan of the feature columns alone", results["scan"], ""),
        ("(a) ONNX Runtime alone, ready arrays", results["ort_alone"], ""),
        ("(b) Python: COPY, pandas, onnxruntime", results["python"], ""),
        ("(c) SQL: SELECT ... FROM cerebro.predictions", results["sql"],
         f"{results['python'] / results['sql']:.2f}x (b), {results['sql'] / floor:.2f}x floor"),
        ("(c) SQL: INSERT INTO t SELECT ... predictions", results["sql_insert"],
         f"{results['python'] / results['sql_insert']:.2f}x (b), {results['sql_insert'] / floor:.2f}x floor, "
         f"{results['python_store'] / results['sql_insert']:.2f}x (b) storing"),
        ("(a) PostgreSQL's INSERT of as many rows, unscored", results["write_floor"], ""),
        ("(b) storing: the same, then COPY of the scores back", results["python_store"], ""),
    ]
    print(f"\n{'batch scoring, ' + format(rows, ',') + ' rows':50} {'seconds':>8} {'rows/s':>11}  ratio")
    for label, seconds, ratio in table:
        print(f"{label:50} {seconds:>8.3f} {rows / seconds:>11,.0f}  {ratio}")
        lines.append({"what": label, "seconds": seconds, "rows_per_s": rows / seconds})
    print(f"(floor = scan + ONNX Runtime alone = {floor:.3f} s; SQL and Python scores agree to {worst:.1e})")

    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    args = ["-h", params["host"], "-p", str(params["port"]), "-U", params["user"], params["dbname"]]
    keys = f"\\set id random(1, {rows})\n"
    predict = keys + f"SELECT cerebro.predict('{MODEL}', t) FROM {TABLE} t WHERE id = :id;\n"
    scripts = [
        ("lookup", keys + f"SELECT tenure FROM {TABLE} WHERE id = :id;\n", ""),
        ("predict", predict, ""),
        # The same calls, each row sent to cerebrod: what scoring in the
        # backend saves.
        ("predict, score_in_backend off", predict, "-c cerebro.score_in_backend=off"),
        ("by_key", keys + f"SELECT score FROM cerebro.predictions WHERE model = '{MODEL}' AND source = '{TABLE}' "
                          f"AND key_column = 'id' AND key = :id::text;\n", ""),
        # The form the issue writes: the model's own source (telco_churn,
        # which the model was trained on), checked for code its reader does
        # not trust.
        ("by_key, own source", "\\set id random(1, 7043)\n"
                               f"SELECT score FROM cerebro.predictions WHERE model = '{MODEL}' AND key = :id::text;\n",
         ""),
    ]
    print(f"\n{'one row, pgbench -M prepared, ' + str(PGBENCH_SECONDS) + ' s':42} {'clients':>7} {'p50 µs':>8} {'p99 µs':>8} {'calls/s':>9}")
    for name, script, settings in scripts:
        for clients in (1, 8):
            r = pgbench(args, script, clients, out_dir, name.replace(", ", "_").replace(" ", "_"), PGBENCH_SECONDS, settings)
            r["what"] = name
            print(f"{name:42} {clients:>7} {r['p50_us']:>8,} {r['p99_us']:>8,} {r['calls_per_s']:>9,.0f}", flush=True)
            lines.append(r)
    with open(os.path.join(out_dir, "scoring.jsonl"), "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
