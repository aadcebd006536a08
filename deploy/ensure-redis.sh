#!/usr/bin/env bash
# Makes sure a Redis answers for the job queue: when nothing answers at URL (default
# redis://127.0.0.1:6379/0) and it is local, starts redis-server there (installing Debian's
# package if it is missing), with its append-only file in out/redis/.
#   deploy/ensure-redis.sh [URL]
set -euo pipefail
BIN=${BIN:-.venv/bin}

URL=${1:-redis://127.0.0.1:6379/0}
ping() { "$BIN/python" -c 'import sys, redis; redis.Redis.from_url(sys.argv[1], socket_connect_timeout=1).ping()' "$URL" 2>/dev/null; }
if ping; then
  echo "==> Redis answers at $URL"
  exit 0
fi
read -r host port < <("$BIN/python" -c 'import sys; from urllib.parse import urlsplit; u = urlsplit(sys.argv[1]); print(u.hostname or "127.0.0.1", u.port or 6379)' "$URL")
case "$host" in
  127.0.0.1|localhost) ;;
  *) echo "no Redis answers at $URL, and it is not local: start it there" >&2; exit 1 ;;
esac
bash "$(dirname "$0")/install-tools.sh" redis-server
mkdir -p out/redis
echo "==> starting redis-server on $host:$port (append-only file in out/redis/; stop it with: redis-cli -p $port shutdown)"
redis-server --port "$port" --bind "$host" --dir "$PWD/out/redis" --appendonly yes \
  --daemonize yes --logfile "$PWD/out/redis/redis.log" --pidfile "$PWD/out/redis/redis.pid"
for _ in $(seq 1 50); do
  ping && exit 0
  sleep 0.1
done
echo "redis-server did not start; see out/redis/redis.log" >&2
exit 1
