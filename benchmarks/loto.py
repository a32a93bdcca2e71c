"""Leave-one-task-out: does spec = 'recommended' reach the default
selection's test metric sooner than the default selection does?

For each task of the accuracy benchmark (benchmarks/accuracy.py, the same
splits):

1. the default selection on the task's training table: its winner's test
   metric (the target) and its wall time W, from the INSERT to the
   selection's end (cerebro.selections);
2. the recommended selection on the same table, with the task's own
   versions and its entry of the shipped portfolio left out
   (cerebro.recommend_exclude), so that it starts only from what the other
   tasks taught: their entries of the portfolio, and the selections this
   run made on them;
3. walking the recommended selection's versions in the order they became
   ready, the leaderboard's first at each moment (by validation metric)
   scores the test table; the first moment its test metric reaches the
   target is the time to reach it.

The issue's bar: the time to reach is at most W / 3. One table is printed,
and written as JSON lines.

    python benchmarks/loto.py CONNINFO OUT_DIR [TASK ...]

deploy/loto.sh sets everything up and runs it (every task but
nycflights13 unless tasks are named).
"""

import json
import sys

import psycopg

import accuracy

METRIC = {"binary": "auc", "multiclass": "accuracy", "regression": "rmse"}


def better(task, a, b):
    """Whether test metric a is at least as good as b."""
    return a <= b if task.kind == "regression" else a >= b


def run(conn, name, task, spec, options, exclude=""):
    """benchmarks/accuracy.py's run_selection, with the models named in
    `exclude` left out of recommendations."""
    conn.execute("SELECT set_config('cerebro.recommend_exclude', %s, false)", (exclude,))
    return accuracy.run_selection(conn, name, task, spec, options)


def timeline(cur, selection, task):
    """The selection's ready versions in the order they became ready:
    (seconds since the INSERT, version, validation metric, class labels)."""
    metric = METRIC[task.kind]
    cur.execute(
        "SELECT extract(epoch FROM m.trained_at - s.created_at)::float8, m.version, (m.metrics->>%s)::float8,"
        "       m.class_labels"
        " FROM cerebro.model_versions m JOIN cerebro.selections s ON s.id = m.selection_id"
        " WHERE s.id = %s AND m.status = 'ready' AND m.metrics ? %s ORDER BY m.trained_at, m.version",
        (metric, selection, metric))
    return cur.fetchall()


def wall_seconds(cur, selection):
    cur.execute("SELECT extract(epoch FROM finished_at - created_at)::float8 FROM cerebro.selections"
                " WHERE id = %s", (selection,))
    return cur.fetchone()[0]


def main():
    conninfo, out_dir = sys.argv[1], sys.argv[2]
    wanted = sys.argv[3:]
    tasks = [t for t in accuracy.TASKS if t.name in wanted] if wanted else \
        [t for t in accuracy.TASKS if t.name != "nycflights13"]
    rows = []
    with psycopg.connect(conninfo) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS accuracy")
        conn.commit()
        for task in tasks:
            df = task.load(conn)
            train, test = accuracy.split(task, df)
            accuracy.load_table(conn, f"{task.name}_train", train)
            accuracy.load_table(conn, f"{task.name}_test", test)
            use_log = accuracy.log_target(task, train)
            options = {"split": "ordered"} if task.time_order else {}
            print(f"==> {task.name}: {len(train)} training rows, {len(test)} test rows", flush=True)
            default_name, recommended_name = f"accuracy_{task.name}", f"loto_{task.name}"
            default = run(conn, default_name, task, "default", options)
            exclude = f"{default_name},{recommended_name},(built in) {task.name}"
            recommended = run(conn, recommended_name, task, "recommended", options, exclude)
            with conn.cursor() as cur:
                default_s = wall_seconds(cur, default)
                cur.execute(
                    "SELECT l.version, m.class_labels FROM cerebro.leaderboard l"
                    " JOIN cerebro.model_versions m ON m.name = %s AND m.version = l.version"
                    " WHERE l.selection = %s AND l.status = 'ready' ORDER BY l.rank, l.version LIMIT 1",
                    (default_name, default))
                version, labels = cur.fetchone()
                target = accuracy.score_version(cur, default_name, task, test, version, labels, use_log)
                recommended_s = wall_seconds(cur, recommended)
                lower = task.kind == "regression"
                best = None
                reached_s = None
                final = None
                for seconds, version, validation, labels in timeline(cur, recommended, task):
                    if best is not None and (validation >= best[1] if lower else validation <= best[1]):
                        continue
                    best = (version, validation)
                    final = accuracy.score_version(cur, recommended_name, task, test, version, labels, use_log)
                    if reached_s is None and better(task, final, target):
                        reached_s = seconds
                cur.execute("SELECT candidates, plan->>'searched' FROM cerebro.selections WHERE id = %s",
                            (recommended,))
                candidates, searched = cur.fetchone()
            conn.commit()
            row = {"task": task.name, "metric": accuracy.metric_name(task, use_log), "default": target,
                   "default_s": default_s, "recommended": final, "recommended_s": recommended_s,
                   "reached_s": reached_s, "ratio": None if reached_s is None else reached_s / default_s,
                   "candidates": candidates, "searched": searched}
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(f"{out_dir}/loto.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print()
    print(f"{'task':14} {'metric':10} {'default':>8} {'default s':>9} {'reached s':>9} {'ratio':>6}"
          f" {'recommended':>11} {'its s':>6} {'cands':>5}")
    for r in rows:
        reached = "never" if r["reached_s"] is None else f"{r['reached_s']:.1f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(f"{r['task']:14} {r['metric']:10} {r['default']:8.4f} {r['default_s']:9.1f} {reached:>9} {ratio:>6}"
              f" {r['recommended']:11.4f} {r['recommended_s']:6.1f} {r['candidates']:5d}")
    met = sum(1 for r in rows if r["ratio"] is not None and r["ratio"] <= 1 / 3)
    print(f"reached the default's test metric within a third of its wall time: {met} of {len(rows)} tasks")
    print("default: the default selection's winner on the test rows, and its wall time; reached: seconds from the"
          " recommended selection's INSERT until its leaderboard's first scored at least as well on the test rows")


if __name__ == "__main__":
    main()
