# Sourced by scripts/demo.sh and scripts/test.sh: installs what a fresh Debian or Ubuntu machine
# lacks (git, Python's venv, redis-server when WITH_REDIS=1, openssh-server when WITH_SSHD=1,
# busybox when WITH_BUSYBOX=1), then the project itself into .venv. Afterwards $PY is the
# virtualenv's python.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "testlooper needs Python 3.11 or newer as python3 (found: $(python3 --version 2>&1))" >&2
  exit 2
fi

missing=()
command -v git >/dev/null 2>&1 || missing+=(git)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if [ "${WITH_REDIS:-0}" = 1 ]; then command -v redis-server >/dev/null 2>&1 || missing+=(redis-server); fi
# sshd serves git over ssh to the operator's mirror tests (they start their own, on loopback).
if [ "${WITH_SSHD:-0}" = 1 ]; then [ -x /usr/sbin/sshd ] || missing+=(openssh-server); fi
# busybox's sh is the /bin/sh of alpine and busybox images: the pod tests run the stage script with it.
if [ "${WITH_BUSYBOX:-0}" = 1 ]; then command -v busybox >/dev/null 2>&1 || missing+=(busybox); fi
if [ ${#missing[@]} -gt 0 ]; then
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  echo "installing ${missing[*]} with apt-get" >&2
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
PY="$PWD/.venv/bin/python"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test]"
export PATH="$PWD/.venv/bin:$PATH"
