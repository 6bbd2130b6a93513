#!/usr/bin/env bash
# The README's quick start: install testlooper, make the demo repository (examples/demo, two
# commits), run both commits on this machine with the embedded history store, then show the
# history and the flaky ranking.
source "$(dirname "$0")/bootstrap.sh"
demo="$(mktemp -d)/demo"
sh examples/make-demo-repo.sh "$demo"
step() { printf '\n$ %s\n' "$*"; "$@" || true; }  # failing tests are part of the show
step testlooper run "$demo" --rev HEAD~1
step testlooper run "$demo"
step testlooper history "$demo"
step testlooper flaky "$demo"
