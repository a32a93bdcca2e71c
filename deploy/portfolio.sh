#!/usr/bin/env bash
# Regenerates the portfolio cerebro.recommend ships (shared/data/portfolio.json):
# runs the accuracy benchmark (deploy/accuracy.sh, every task or those named),
# then keeps the best single candidate of each task with its meta-features.
# Rebuild the extension afterwards (deploy/test.sh or deploy/demo.sh do).
#
#   deploy/portfolio.sh                       every task of the accuracy benchmark
#   deploy/portfolio.sh telco_churn ames      those tasks only
source "$(dirname "$0")/lib.sh"

"$ROOT/deploy/accuracy.sh" "$@"
step "Writing the portfolio from the accuracy run's candidates"
"$ACCURACY_VENV/bin/python" "$ROOT/benchmarks/portfolio.py" "$ACCURACY_CONNINFO" "$ROOT/shared/data/portfolio.json"
