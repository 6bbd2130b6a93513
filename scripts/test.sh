#!/usr/bin/env bash
# Install everything the test suite needs, then run it. This is the README's test command and
# what CI runs (.ci/run). Extra arguments go to pytest, e.g. `scripts/test.sh -k definitions`.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: git (test repositories) and redis-server (the Redis history store tests
# start their own server on a free loopback port).
missing=()
command -v git >/dev/null 2>&1 || missing+=(git)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ]; then
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  echo "installing ${missing[*]} with apt-get" >&2
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
exec python3 -m pytest -q "$@"
