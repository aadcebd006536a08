#!/usr/bin/env bash
# `make run`: start `sdserve serve` on the default model, generate one image, run one as an
# asynchronous job through Redis, stop cleanly.
set -euo pipefail
BIN=${BIN:-.venv/bin}
GRPC_PORT=${GRPC_PORT:-9000}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
PROMPT=${PROMPT:-a red circle on a blue background}
OUT=${OUT:-out/sdserve.png}
LOG=${LOG:-out/sdserve-serve.log}
mkdir -p "$(dirname "$OUT")" "$(dirname "$LOG")"

echo "==> starting sdserve on the built-in model (log: $LOG)"
echo "    (the Denoiser compiles its U-Net on start-up: about 2 minutes on 2 CPU cores)"
"$BIN/sdserve" serve --grpc-port "$GRPC_PORT" --redis-url "$REDIS_URL" >"$LOG" 2>&1 &
server=$!
stop() {
  if kill -0 "$server" 2>/dev/null; then
    echo "==> stopping sdserve"
    kill -INT "$server"
    wait "$server" || true
  fi
}
trap stop EXIT

for _ in $(seq 1 1200); do
  grep -q "sdserve is serving" "$LOG" && break
  if ! kill -0 "$server" 2>/dev/null; then
    echo "sdserve serve exited before it was ready; the end of $LOG:" >&2
    tail -n 30 "$LOG" >&2
    exit 1
  fi
  sleep 0.5
done
grep -q "sdserve is serving" "$LOG" || { echo "sdserve did not start in 10 minutes" >&2; exit 1; }

echo "==> generating: $PROMPT"
"$BIN/sdserve" generate "$PROMPT" --seed "${SEED:-0}" --server "127.0.0.1:$GRPC_PORT" -o "$OUT"
echo "==> your image is at $(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")"
echo "==> does it follow the prompt? (the checker of sdserve eval-default-model)"
"$BIN/sdserve" check-image "$OUT" "$PROMPT" || echo "    not quite: the default model is small"

JOB_OUT="${OUT%.png}-job.png"
echo "==> the same prompt as an asynchronous job (kept in Redis until it is done)"
job=$("$BIN/sdserve" submit "$PROMPT" --server "127.0.0.1:$GRPC_PORT")
echo "    job id: $job"
"$BIN/sdserve" job "$job" --wait --server "127.0.0.1:$GRPC_PORT" -o "$JOB_OUT"
