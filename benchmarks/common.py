"""What the benchmarks share: timing, and a model trained once and kept."""

import io
import os
import statistics
import subprocess
import sys
import time

import pandas as pd


def median_seconds(f, repeats, setup=None):
    """The median wall time of `repeats` calls of `f`, each after an
    untimed call of `setup` when there is one."""
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def train_once(conn, model, source, key, options, what):
    """The newest ready version of `model`, else a new one trained on
    `source` (target churn) with `options` (JSON text), waited for up to 10
    minutes; `what` describes it in the log."""
    with conn.cursor() as cur:
        cur.execute("SELECT max(version) FROM cerebro.models WHERE name = %s AND status = 'ready'", (model,))
        version = cur.fetchone()[0]
        if version is not None:
            print(f"    model {model} v{version}: ready, kept", flush=True)
            return version
        print(f"    model {model}: training ({what})", flush=True)
        cur.execute(
            """INSERT INTO cerebro.models (name, source, target, key, options)
               VALUES (%s, %s, 'churn', %s, %s)""",
            (model, source, key, options),
        )
        cur.execute("SELECT max(version) FROM cerebro.models WHERE name = %s", (model,))
        version = cur.fetchone()[0]
        deadline = time.time() + 600
        while time.time() < deadline:
            cur.execute("SELECT status, error FROM cerebro.models WHERE name = %s AND version = %s", (model, version))
            status, error = cur.fetchone()
            if status == "ready":
                return version
            if status in ("failed", "cancelled"):
                sys.exit(f"training {model} v{version} {status}: {error}")
            time.sleep(0.5)
        sys.exit(f"training {model} v{version} took longer than 10 minutes")


def copy_frame(conn, table, columns, text_columns):
    """`columns` of every row of `table`, by COPY (csv) into pandas, as a
    client reads them: `text_columns` as strings, empty fields as NULL."""
    buf = io.BytesIO()
    with conn.cursor() as cur:
        with cur.copy(f"COPY (SELECT {', '.join(columns)} FROM {table}) TO STDOUT WITH (FORMAT csv, HEADER)") as copy:
            for block in copy:
                buf.write(block)
    buf.seek(0)
    return pd.read_csv(buf, keep_default_na=False, na_values=[""], dtype={c: object for c in text_columns})


def pgbench(conninfo_args, script, clients, out_dir, name, seconds, settings=""):
    """Runs `script` with pgbench -M prepared for `seconds` at `clients`
    clients (PGOPTIONS `settings`); its percentiles from --log."""
    path = os.path.join(out_dir, f"{name}.sql")
    with open(path, "w") as f:
        f.write(script)
    prefix = os.path.join(out_dir, f"pgbench_{name}_{clients}")
    for old in os.listdir(out_dir):
        if old.startswith(os.path.basename(prefix) + "."):
            os.remove(os.path.join(out_dir, old))
    subprocess.run(
        ["pgbench", "-n", "-M", "prepared", "-T", str(seconds), "-c", str(clients), "-j", str(min(clients, 2)),
         "-f", path, "--log", f"--log-prefix={prefix}", *conninfo_args],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "PGOPTIONS": settings},
    )
    latencies = []
    for log in os.listdir(out_dir):
        if log.startswith(os.path.basename(prefix) + "."):
            with open(os.path.join(out_dir, log)) as f:
                latencies += [int(line.split()[2]) for line in f]
    latencies.sort()
    pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
    return {"what": name, "clients": clients, "p50_us": pct(0.50), "p99_us": pct(0.99),
            "calls_per_s": len(latencies) / seconds}
