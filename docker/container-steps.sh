#!/usr/bin/env bash
# The container image's build and start steps (docker/Dockerfile) as a plain script, for machines
# with no Docker engine. Keep the two in step.
#
#   1. the build context: a clean copy of the repository at HEAD (git archive: committed files only)
#   2. build stage: npm ci, npm run build
#   3. run stage: package files + a production-only install (npm ci --omit=dev) + dist/ + the Lua
#      scripts (services/lua) + the default inventory + the console's page and stylesheet
#      (ui/*.html, ui/*.css), nothing else
#   4. start it as the image does (node dist/server.js, NODE_ENV=production) in embedded mode,
#      probe it with the image's HEALTHCHECK command, then expect 200 from /health
#   5. SIGTERM, and expect a clean exit
#
# Environment: INVENTORY_FILE (default: the repository's default inventory), PORT (default: a free
# one), NPM_FLAGS (extra flags for both npm ci, e.g. --prefer-offline), KEEP=1 keeps the work dir.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/maestro-container-XXXXXX")
server_pid=''
started=$SECONDS

cleanup () {
  if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then kill -KILL "$server_pid" 2>/dev/null || true; fi
  if [[ "${KEEP:-}" != 1 ]]; then rm -rf "$work"; else echo "kept $work"; fi
}
trap cleanup EXIT

step () { echo "== [$((SECONDS - started))s] $*"; }
fail () { echo "FAILED: $*" >&2; [[ -f "$work/server.log" ]] && tail -n 30 "$work/server.log" >&2; exit 1; }

mkdir -p "$work/context" "$work/app"
if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  step "1. build context: $repo at HEAD ($(git -C "$repo" rev-parse --short HEAD))"
  git -C "$repo" archive HEAD | tar -xf - -C "$work/context"
else
  step "1. build context: $repo (not a git checkout)"
  # Not a git checkout (an unpacked archive): everything but what .dockerignore leaves out.
  tar -C "$repo" --exclude=./.git --exclude=./node_modules --exclude=./dist --exclude=./.tap --exclude=./.env -cf - . | tar -xf - -C "$work/context"
fi

step "2. build stage: npm ci, npm run build"
(cd "$work/context" && npm ci --no-audit --no-fund ${NPM_FLAGS:-} >"$work/npm-build.log" 2>&1) || { tail -n 30 "$work/npm-build.log" >&2; fail "npm ci (build stage)"; }
(cd "$work/context" && npm run build >>"$work/npm-build.log" 2>&1) || { tail -n 30 "$work/npm-build.log" >&2; fail "npm run build"; }

step "3. run stage: production install, dist/, default inventory"
cp "$work/context/package.json" "$work/context/package-lock.json" "$work/context/inventory.default.json" "$work/app/"
(cd "$work/app" && npm ci --omit=dev --no-audit --no-fund ${NPM_FLAGS:-} >"$work/npm-run.log" 2>&1) || { tail -n 30 "$work/npm-run.log" >&2; fail "npm ci --omit=dev (run stage)"; }
cp -R "$work/context/dist" "$work/app/dist"
mkdir -p "$work/app/ui" && cp "$work/context/ui/"*.html "$work/context/ui/"*.css "$work/app/ui/"
# the Lua scripts of the Redis stores, read at start (Dockerfile: COPY services/lua)
mkdir -p "$work/app/services" && cp -R "$work/context/services/lua" "$work/app/services/lua"
[[ ! -e "$work/app/node_modules/typescript" ]] || fail "a dev dependency (typescript) is in the production install"

port=${PORT:-$(node -e "const s = require('node:net').createServer().listen(0, '127.0.0.1', () => { console.log(s.address().port); s.close() })")}
step "4. start: node dist/server.js on port $port (NODE_ENV=production, embedded mode)"
cd "$work/app"
env -u MARIADB_URL -u REDIS_URL -u ConnectionStrings__MariaDb -u ConnectionStrings__Redis -u REDIS_SENTINELS -u REDIS_CLUSTER_NODES \
  NODE_ENV=production LEASE_STORE=memory PORT="$port" HOST=127.0.0.1 ${INVENTORY_FILE:+INVENTORY_FILE="$INVENTORY_FILE"} \
  node dist/server.js >"$work/server.log" 2>&1 &
server_pid=$!

healthy=''
for _ in $(seq 1 100); do
  kill -0 "$server_pid" 2>/dev/null || fail "the server exited at start-up"
  if PORT="$port" HOST=127.0.0.1 node dist/scripts/healthcheck.js; then healthy=1; break; fi
  sleep 0.2
done
[[ -n "$healthy" ]] || fail "HEALTHCHECK (node dist/scripts/healthcheck.js) never passed"
step "HEALTHCHECK passed"

health=$(node -e "fetch('http://127.0.0.1:$port/health').then(async (r) => { console.log(r.status + ' ' + await r.text()); process.exit(r.status === 200 ? 0 : 1) }, (e) => { console.log(String(e)); process.exit(1) })") || fail "/health: $health"
echo "/health: $health"
for page in ui/ ui/console.js ui/console.css ui/usage.js ui/uPlot.esm.js; do
  answer=$(node -e "fetch('http://127.0.0.1:$port/$page').then((r) => { console.log(r.status); process.exit(r.status === 200 ? 0 : 1) }, (e) => { console.log(String(e)); process.exit(1) })") || fail "/$page: $answer"
done
echo "console: /ui/ and its files answer 200"

step "5. SIGTERM"
kill -TERM "$server_pid"
code=0
wait "$server_pid" || code=$?
server_pid=''
[[ "$code" == 0 ]] || fail "the server exited with $code after SIGTERM"
grep -q '"level":' "$work/server.log" || fail "no JSON log lines (production logs are pino JSON)"
step "container steps passed"
