#!/bin/sh
# The demo's build: package the library into the build output directory.
set -eu
mkdir -p "$TEST_BUILD_OUTPUT_DIR/lib"
cp src/calc.py "$TEST_BUILD_OUTPUT_DIR/lib/calc.py"
echo "built from $(head -n 1 "$TEST_SRC_DIR/.git_commit")" > "$TEST_BUILD_OUTPUT_DIR/BUILD_INFO"
echo "build ok"
