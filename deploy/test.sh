#!/usr/bin/env bash
# Runs every test tier of Cerebro against real parts. Idempotent: set-up work
# already done is skipped.
#
#   1. cargo test           shared/, model/ and daemon/ (engine, ONNX export
#                           through the real ONNX Runtime, protocol, batch
#                           layout)
#   2. cargo pgrx test      fdw/ inside a throwaway PostgreSQL 15, run as the
#                           postgres OS user (initdb refuses root)
#   3. end-to-end           tests/ against the project-local cluster with the
#                           release extension and real cerebrod processes
#   4. security             hostile roles and local users replay attacks
#                           against the same cluster (tests/tests/security/)
#   5. robustness           real clients and real faults: prepared statements,
#                           PostgreSQL restarted (fast, immediate) and cerebrod
#                           killed under its watchdog mid-training
#                           (tests/tests/robustness/); last, since it restarts
#                           the cluster
#
# While working on one part, CEREBRO_TIERS="3 4" deploy/test.sh some_name
# runs only those tiers, and only the end-to-end and security tests whose
# names contain some_name.
source "$(dirname "$0")/lib.sh"

TIERS=${CEREBRO_TIERS:-1 2 3 4 5}
FILTER=("$@")
wants() { [[ " $TIERS " == *" $1 "* ]]; }

E2E_DB=cerebro_e2e
setup_everything
ensure_test_python
mkdir -p "$LOG_DIR"
RESULTS=$LOG_DIR/test-results.txt
: >"$RESULTS"
# Where the server log stands now: no backend may die by a signal from here on.
SERVER_LOG=$LOG_DIR/postgresql.log
SERVER_LOG_START=$(stat -c %s "$SERVER_LOG" 2>/dev/null || echo 0)
# Runs a tier, keeping its output to count the results at the end.
tier() { "$@" 2>&1 | tee -a "$RESULTS"; }

if wants 1; then
    step "Tier 1/5: cargo test (shared, model, daemon)"
    # NVRTC is installed everywhere, so the GPU kernels are compiled even where
    # no GPU is (the GPU training tests then skip, saying so).
    tier env -C "$ROOT" CEREBRO_REQUIRE_ORT=1 CEREBRO_ORT_LIBRARY="$ORT_LIB" \
        CEREBRO_REQUIRE_NVRTC=1 LD_LIBRARY_PATH="$CUDA_LIB_DIR" cargo test --release --lib --bins --tests
fi

if wants 2; then
    step "Tier 2/5: cargo pgrx test (fdw) as the postgres OS user"
    PGRX_TEST_DIR=$STATE/pgrx-test
    as_root rm -rf "$PGRX_TEST_DIR"
    mkdir -p "$PGRX_TEST_DIR"
    as_root chown postgres: "$PGRX_TEST_DIR"
    # pgrx test installs a test build of the extension where the release one
    # is (unlinked first: live backends keep theirs); then the release build
    # goes back.
    unlink_extension_library
    tier env -C "$ROOT/fdw" cargo pgrx test --runas postgres --pgdata "$PGRX_TEST_DIR/data" pg15
    install_extension
fi

# e2e_tier NAME TEST: runs one suite of tests/ against a fresh database.
e2e_tier() {
    ensure_cluster
    ensure_database "$E2E_DB" fresh
    write_daemon_config cerebrod-e2e "$E2E_DB"
    stop_daemon cerebrod-e2e
    load_telco "$E2E_DB"
    tier env -C "$ROOT" \
        CEREBRO_E2E_PGHOST="$RUN_DIR" CEREBRO_E2E_PGPORT="$PGPORT" CEREBRO_E2E_DB="$E2E_DB" \
        CEREBRO_E2E_DAEMON="$DAEMON_BIN" CEREBRO_E2E_CONFIG="$STATE/cerebrod-e2e.toml" \
        CEREBRO_E2E_SOCKET="$RUN_DIR/cerebrod-e2e.sock" CEREBRO_E2E_LOG="$LOG_DIR/cerebrod-e2e.log" \
        CEREBRO_E2E_PYTHON="$TEST_VENV/bin/python" CEREBRO_E2E_PGBIN="$PG_BIN" \
        CEREBRO_E2E_PGDATA="$PGDATA_DIR" CEREBRO_E2E_PGLOG="$LOG_DIR/postgresql.log" \
        cargo test --release -p cerebro-tests --test "$1" -- --test-threads=1 "${FILTER[@]}"
}

if wants 3; then
    step "Tier 3/5: end-to-end tests (real PostgreSQL, real cerebrod)"
    e2e_tier end_to_end
    e2e_tier predict
fi

if wants 4; then
    step "Tier 4/5: security tests (hostile roles and OS users against the same parts)"
    e2e_tier security
fi

if wants 5; then
    step "Tier 5/5: robustness (prepared statements, PostgreSQL restarted, cerebrod killed under its watchdog)"
    e2e_tier robustness
    # The tests restart the cluster: whatever else they left, it runs again.
    ensure_cluster
fi

# A backend a test kills on purpose (its last query says so) is passed over.
if tail -c +$((SERVER_LOG_START + 1)) "$SERVER_LOG" | awk '
        /terminated by signal/ { if (pending) print pending; pending = $0; next }
        pending { if ($0 !~ /killed_on_purpose_by_a_test/) print pending; pending = "" }
        END { if (pending) print pending }' | grep 'terminated by signal'; then
    die "a PostgreSQL backend died by a signal during the tests (see $SERVER_LOG)"
fi

step "All test tiers passed"
grep -E '^test result:' "$RESULTS" |
    sed -E 's/.* ([0-9]+) passed; ([0-9]+) failed.*/\1 \2/' |
    awk '{ p += $1; f += $2 } END { printf "cerebro: %d passed, %d failed\n", p, f }'
