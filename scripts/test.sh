#!/usr/bin/env bash
# The README's test command, and what CI runs (.ci/run): install everything the tests need, then
# run the whole suite. Tests start their own services (redis-server on a free loopback port, git
# repositories in temporary folders). Extra arguments go to pytest: scripts/test.sh -k definitions
WITH_REDIS=1 source "$(dirname "$0")/bootstrap.sh"
exec "$PY" -m pytest -q "$@"
