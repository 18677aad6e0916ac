#!/usr/bin/env bash
# Install the OS packages the test suite drives for real: espeak-ng and sox (test speech),
# chromium (browser tests), prometheus/promtool (dashboard and alert tests), redis-server
# and nginx (multi-node tests), postgresql (the shared store's tests: the server programs only, a
# throwaway cluster per test run). Already-present packages are skipped; installing needs root.
set -euo pipefail
declare -A need=(
  [espeak-ng]=espeak-ng
  [sox]=sox
  [chromium]=chromium
  [prometheus]=prometheus
  [promtool]=prometheus
  [redis-server]=redis-server
  [nginx]=nginx
)
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done
# Debian keeps PostgreSQL's server programs off PATH
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1 \
  || missing+=(postgresql)
[ ${#missing[@]} -eq 0 ] && exit 0
packages=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
if [ "$(id -u)" -ne 0 ]; then
  echo "missing OS packages: $packages" >&2
  echo "install them with: sudo apt-get install -y $packages" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $packages >/dev/null
# Debian starts these as services on install; the tests start their own on loopback.
for svc in prometheus redis-server nginx postgresql; do
  if command -v systemctl >/dev/null 2>&1; then systemctl stop "$svc" 2>/dev/null || true; fi
  pkill -x "$svc" 2>/dev/null || true
done
