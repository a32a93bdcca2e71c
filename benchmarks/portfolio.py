"""The portfolio cerebro.recommend ships: the best single candidate of each
task of the accuracy benchmark, with its task's meta-features.

    python benchmarks/portfolio.py CONNINFO OUT_FILE

Run after deploy/accuracy.sh, on its database (cerebro_accuracy, where
each task's selection left its candidates); deploy/portfolio.sh does both
and writes shared/data/portfolio.json, which the extension embeds.
"""

import json
import sys

import psycopg

# Each task kind's validation metric, and whether lower is better.
METRIC = {"binary": ("auc", False), "multiclass": ("accuracy", False), "regression": ("rmse", True)}


def main():
    conninfo, out_file = sys.argv[1], sys.argv[2]
    entries = []
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(
            """SELECT m.name, m.task, s.meta, m.options, m.metrics
               FROM cerebro.model_versions m JOIN cerebro.snapshots s ON s.id = m.snapshot_id
               WHERE m.name LIKE 'accuracy\\_%' AND m.status = 'ready' AND s.meta IS NOT NULL
                 AND m.request->'ensemble' IS NULL"""
        ).fetchall()
    best = {}
    for name, task, meta, options, metrics in rows:
        metric, lower = METRIC[task]
        value = (metrics or {}).get(metric)
        if value is None:
            continue
        kept = best.get(name)
        if kept is None or (value < kept["value"] if lower else value > kept["value"]):
            task_name = name.removeprefix("accuracy_")
            best[name] = {"task": task_name, "metric": metric, "value": value, "meta": meta, "options": options}
    entries = [best[k] for k in sorted(best)]
    with open(out_file, "w") as f:
        json.dump(entries, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"    {len(entries)} tasks: {', '.join(e['task'] for e in entries)} -> {out_file}")


if __name__ == "__main__":
    main()
