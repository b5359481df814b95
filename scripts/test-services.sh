#!/usr/bin/env bash
# `npm test` runs this first (pretest): it makes sure what the tests talk to is here and answering,
# so one command runs the suite on a fresh machine. Installs what is missing (Debian's
# redis-sentinel and chromium, as root), starts MariaDB and Redis when they do not answer, and waits
# for them. Never fails by itself: a test that needs a missing service fails, naming it.
set -uo pipefail

apt_install () {
  if [ "$(id -u)" -ne 0 ]; then echo "test services: $1 is missing; install it (apt-get install -y $1) as root" >&2; return; fi
  if [ -z "${APT_UPDATED:-}" ]; then apt-get update >/dev/null && APT_UPDATED=1; fi
  echo "== installing $1"
  DEBIAN_FRONTEND=noninteractive apt-get install -y "$1" >/dev/null || echo "test services: $1 could not be installed" >&2
}

# the high-availability tests run real sentinels; the console's tests drive Debian's Chromium
# (playwright-core downloads no browser)
command -v redis-sentinel >/dev/null 2>&1 || apt_install redis-sentinel
[ -x /usr/bin/chromium ] || apt_install chromium

mariadb_up () { mariadb-admin --protocol=tcp -h 127.0.0.1 -u root ping >/dev/null 2>&1 || mysqladmin --protocol=tcp -h 127.0.0.1 -u root ping >/dev/null 2>&1; }
redis_up () { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = "PONG" ]; }

if ! mariadb_up; then
  echo "== starting MariaDB"
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
fi
if ! redis_up; then
  echo "== starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
fi
for _ in $(seq 1 60); do
  if mariadb_up && redis_up; then break; fi
  sleep 1
done
mariadb_up || echo "MariaDB is not answering on 127.0.0.1:3306 (tests that need it will fail)" >&2
redis_up || echo "Redis is not answering on 127.0.0.1:6379 (tests that need it will fail)" >&2
exit 0
