#!/usr/bin/env bash
# Stops the demo's daemons and PostgreSQL cluster. --wipe also deletes them.
source "$(dirname "$0")/lib.sh"

# Each daemon has NAME.pid, and NAME.watchdog.pid for the watchdog that
# restarts it (deploy/watchdog.sh); stop_daemon stops both.
for pidfile in "$RUN_DIR"/*.pid; do
    [ -e "$pidfile" ] || continue
    name=$(basename "$pidfile" .pid)
    name=${name%.watchdog}
    daemon_running "$name" || watchdog_running "$name" || { rm -f "$pidfile"; continue; }
    step "Stopping cerebrod ($name) and its watchdog"
    stop_daemon "$name"
done
if [ -f "$PGDATA_DIR/PG_VERSION" ] && as_postgres "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" status >/dev/null 2>&1; then
    step "Stopping PostgreSQL"
    as_postgres "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -m fast -w stop >/dev/null
fi
if [ "${1:-}" = --wipe ]; then
    step "Deleting $PGDATA_DIR and $RUN_DIR"
    as_root rm -rf "$PGDATA_DIR" "$RUN_DIR" "$LOG_DIR"
fi
