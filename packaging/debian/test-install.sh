#!/usr/bin/env bash
# Installs the Debian package built by `cargo deb -p gateway` on this machine and checks it:
# the binary runs, the system user exists, the packaged config passes check-config as that
# user, the unit passes `systemd-analyze verify`, the gateway starts as that user on the
# packaged config and stops cleanly, and purging removes it all. Needs root; run by .ci/run.
set -euo pipefail
deb=${1:?usage: test-install.sh PATH.deb}

if [ "$(id -u)" != 0 ]; then
  echo "test-install.sh: needs root (dpkg -i)" >&2
  exit 1
fi

echo "== dpkg -i $deb"
DEBIAN_FRONTEND=noninteractive dpkg -i "$deb"
trap 'DEBIAN_FRONTEND=noninteractive dpkg --purge gateway >/dev/null 2>&1 || true' EXIT

gateway --version
id gateway
test "$(stat -c %U:%G /var/lib/gateway)" = gateway:gateway
test "$(stat -c %a /etc/gateway/gateway.toml)" = 640

echo "== check-config as the gateway user"
runuser -u gateway -- gateway check-config /etc/gateway/gateway.toml

if command -v systemd-analyze >/dev/null 2>&1; then
  echo "== systemd-analyze verify"
  # Warnings about the host (no running systemd in a container) are not the unit's: only a
  # line naming gateway.service (a bad setting, a missing binary) fails the check.
  out=$(systemd-analyze verify /lib/systemd/system/gateway.service 2>&1 || true)
  echo "$out"
  if echo "$out" | grep -q 'gateway\.service'; then
    echo "test-install.sh: the unit does not verify" >&2
    exit 1
  fi
elif [ -n "${CI:-}" ]; then
  echo "test-install.sh: systemd-analyze is missing (apt-get install systemd)" >&2
  exit 1
fi

echo "== the packaged gateway starts as its user and stops on SIGTERM"
# Ports of its own, so a gateway already running here is not in the way.
conf=$(mktemp)
sed -e 's/127.0.0.1:7700/127.0.0.1:0/' -e 's/127.0.0.1:8080/127.0.0.1:0/' \
  /etc/gateway/gateway.toml > "$conf"
printf '\n[mqtt.embedded]\nlisten = "127.0.0.1:%s"\n' \
  "$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')" >> "$conf"
chmod 644 "$conf"
log=$(mktemp)
runuser -u gateway -- gateway run --config "$conf" >"$log" 2>&1 &
pid=$!
for _ in $(seq 100); do
  if grep -q "devices: listening" "$log" && [ -s /var/lib/gateway/gateway.db ]; then break; fi
  sleep 0.1
done
grep -q "devices: listening" "$log" || { cat "$log"; exit 1; }
sleep 1
# The gateway itself, not runuser, gets the signal (as systemd sends it to the main process).
kill -TERM "$(pgrep -u gateway -x gateway)"
status=0
wait "$pid" || status=$?
if [ "$status" != 0 ]; then
  cat "$log"
  echo "test-install.sh: the gateway exited with $status on SIGTERM" >&2
  exit 1
fi
test -s /var/lib/gateway/api.token
test "$(stat -c %U /var/lib/gateway/gateway.db)" = gateway
rm -f "$conf" "$log"

echo "== dpkg --purge"
DEBIAN_FRONTEND=noninteractive dpkg --purge gateway
trap - EXIT
test ! -e /usr/bin/gateway
test ! -e /var/lib/gateway
! id gateway >/dev/null 2>&1
echo "test-install.sh: the Debian package installs, runs and purges cleanly"
