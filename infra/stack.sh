#!/usr/bin/env bash
# The local server stack on 127.0.0.1: SeaweedFS (S3), MLflow server, Prefect server, and a Dask
# scheduler with two single-threaded worker processes (for federate.task_runner=dask).
#   infra/stack.sh up [service...]      start (idempotent), wait until healthy, write infra/stack.env
#                                       (with FEDFORGET_DASK_ADDRESS)
#   infra/stack.sh status [service...]  report (exit 3 if any is not healthy)
#   infra/stack.sh down [service...]    stop by PID (Dask workers before the scheduler); data stays
#                                       under $FEDFORGET_STACK_DIR
# Services: seaweedfs mlflow prefect dask-scheduler dask-workers. Settings: see the docstring of
# infra/stack.py.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${FEDFORGET_PYTHON:-$root/.venv/bin/python}"
if [ ! -x "$python" ]; then
  echo "error: $python not found: run 'make install' first (or set FEDFORGET_PYTHON)" >&2
  exit 2
fi
exec "$python" "$root/infra/stack.py" "$@"
