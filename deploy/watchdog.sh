#!/usr/bin/env bash
# A small supervisor for machines without systemd (containers, the demo):
# runs a command and starts it again when it fails, as systemd's
# Restart=on-failure does for deploy/cerebrod.service.
#
#   deploy/watchdog.sh PIDFILE LOG COMMAND [ARGS...]
#
# Appends COMMAND's output to LOG, with one line of its own for each exit and
# restart. COMMAND's pid goes into PIDFILE at every start, the watchdog's own
# into PIDFILE with .pid replaced by .watchdog.pid. After COMMAND exits with a
# failure or is killed by a signal (kill -9, a crash), it is started again
# after CEREBRO_RESTART_SEC seconds (default 2). It is not restarted when it
# exits with status 0 (a graceful stop: SIGTERM to COMMAND itself), and the
# watchdog stops when it gets SIGTERM or SIGINT, which it passes on to
# COMMAND before waiting for it to exit. deploy/lib.sh starts cerebrod under
# it (ensure_daemon) and stops both (stop_daemon).
set -u

if [ $# -lt 3 ]; then
    echo "usage: $0 PIDFILE LOG COMMAND [ARGS...]" >&2
    exit 2
fi
PIDFILE=$1 LOG=$2
shift 2
# Nothing the caller holds open stays open in the watchdog and the command,
# which outlive it (the lock of `flock ... deploy/test.sh`, say).
for fd in /proc/$$/fd/*; do
    fd=${fd##*/}
    if [ "$fd" -gt 2 ] && [ -e "/proc/$$/fd/$fd" ]; then eval "exec $fd>&-"; fi
done
WATCHDOG_PIDFILE=${PIDFILE%.pid}.watchdog.pid
RESTART_SEC=${CEREBRO_RESTART_SEC:-2}

say() { printf '%s watchdog[%d]: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%S.%6NZ)" $$ "$*" >>"$LOG"; }

child=""
stopping=""
on_signal() {
    stopping=$1
    if [ -n "$child" ]; then
        kill -TERM "$child" 2>/dev/null
    fi
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT

if ! : >>"$LOG"; then
    echo "$0: cannot append to $LOG" >&2
    exit 1
fi
echo $$ >"$WATCHDOG_PIDFILE"
say "supervising: $*"
while [ -z "$stopping" ]; do
    "$@" </dev/null >>"$LOG" 2>&1 &
    child=$!
    echo "$child" >"$PIDFILE"
    # wait returns early when a trapped signal arrives; the child is then
    # waited for again until it has exited.
    wait "$child"
    status=$?
    while kill -0 "$child" 2>/dev/null; do
        wait "$child"
        status=$?
    done
    child=""
    if [ -n "$stopping" ]; then
        say "stopped by SIG$stopping (the command exited with status $status)"
        break
    fi
    if [ "$status" -eq 0 ]; then
        say "the command exited with status 0 (a graceful stop); not restarting it"
        break
    fi
    if [ "$status" -gt 128 ]; then
        how="was killed by signal $((status - 128))"
    else
        how="exited with status $status"
    fi
    say "the command $how; starting it again in ${RESTART_SEC} s"
    # In the background, so that a stop request does not wait for the sleep.
    sleep "$RESTART_SEC" &
    wait $!
    kill $! 2>/dev/null
done
rm -f "$PIDFILE" "$WATCHDOG_PIDFILE"
