#!/usr/bin/env bash
# The README's test command, and what CI runs (.ci/run): install everything the tests need, then
# run the whole suite. Tests start their own services (redis-server and sshd on free loopback ports,
# the Kubernetes emulator, git repositories in temporary folders).
# Extra arguments go to pytest: scripts/test.sh -k definitions
WITH_REDIS=1 WITH_SSHD=1 WITH_BUSYBOX=1 source "$(dirname "$0")/bootstrap.sh"
exec "$PY" -m pytest -q "$@"
