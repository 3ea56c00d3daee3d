#!/usr/bin/env bash
# The local demo behind `make demo`: start Kafka and Redis, run ThrottleX (worker, sink and API in one
# process), drive traffic through a demo gateway, show who got blocked and a quota report, stop.
# Expects `throttlex` on PATH (the Makefile puts .venv/bin first).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"
state="$root/.throttlex"
mkdir -p "$state"
api_port=${THROTTLEX_API_PORT:-8080}
duration_s=${DEMO_DURATION_S:-20}

was_running=$("$here/services.sh" status | grep -c running || true)
"$here/services.sh" up

echo "[demo] starting throttlex run (log: $state/demo-run.log)"
throttlex run --api-port "$api_port" >"$state/demo-run.log" 2>&1 &
run_pid=$!

finish() {
  status=$?
  if kill -0 "$run_pid" 2>/dev/null; then
    echo "[demo] stopping throttlex run"
    kill -TERM "$run_pid"
    wait "$run_pid" || { echo "[demo] throttlex run exited with an error; last lines of its log:"; tail -n 20 "$state/demo-run.log"; status=1; }
  fi
  if [ "$was_running" -eq 0 ]; then "$here/services.sh" down; fi
  exit $status
}
trap finish EXIT

deadline=$((SECONDS + 90))
until python3 -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:$api_port/healthz', timeout=2).status != 200)" 2>/dev/null; do
  if ! kill -0 "$run_pid" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
    echo "[demo] error: throttlex run did not become healthy; last lines of its log:" >&2
    tail -n 30 "$state/demo-run.log" >&2
    exit 1
  fi
  sleep 0.5
done
echo "[demo] throttlex is healthy: API on http://127.0.0.1:$api_port (docs at /docs)"

throttlex loadgen --duration "$duration_s" --api-url "http://127.0.0.1:$api_port"
