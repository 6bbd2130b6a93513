#!/bin/sh
# Make a fresh git repository from examples/demo with two commits: the first is all green
# (apart from a flaky test), the second breaks one test case.
#   sh examples/make-demo-repo.sh DEST
set -eu
dest=${1:?usage: make-demo-repo.sh DEST}
here=$(cd "$(dirname "$0")" && pwd)
if [ -e "$dest" ] && [ -n "$(ls -A "$dest" 2>/dev/null)" ]; then
  echo "make-demo-repo.sh: $dest exists and is not empty" >&2
  exit 2
fi
mkdir -p "$dest"
cp -R "$here/demo/." "$dest/"
cd "$dest"
export GIT_AUTHOR_NAME="TestLooper demo" GIT_AUTHOR_EMAIL="demo@testlooper.invalid"
export GIT_COMMITTER_NAME="$GIT_AUTHOR_NAME" GIT_COMMITTER_EMAIL="$GIT_AUTHOR_EMAIL"
git init -q -b main .
git add -A
git commit -q -m "Add the calculator, its build and its tests"
# The second commit "simplifies" subtract and breaks it.
sed 's/return a - b/return a + b  # simplified/' calc.py > calc.py.new && mv calc.py.new calc.py
git commit -q -am "Simplify subtract"
echo "$dest: demo repository with 2 commits on main"
