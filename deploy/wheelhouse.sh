#!/usr/bin/env bash
# The wheelhouse deploy/Dockerfile installs from, so that the build needs no package index:
# the project's wheel and every dependency as a binary wheel for the image's Python
# (CPython 3.11 on glibc <= 2.36 x86-64, as in Debian bookworm), whatever the host's.
#
#   deploy/wheelhouse.sh [DIR [REQUIREMENT...]]   # DIR: wheels; add locust for --target loadtest
#
# Run from the repository root; PYTHON (.venv/bin/python) is the pip that downloads. Wheels
# already in DIR are kept, so a second run downloads only what changed.
set -euo pipefail
dir=${1:-wheels}
shift $(($# > 0 ? 1 : 0))
python=${PYTHON:-.venv/bin/python}
mkdir -p "$dir"
rm -f "$dir"/issuer-*.whl
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$dir" .
# manylinux_2_5 (manylinux1) up to bookworm's glibc 2.36; pip does not widen the range itself
platforms=()
for minor in $(seq 5 36); do
    platforms+=(--platform "manylinux_2_${minor}_x86_64")
done
# pip evaluates environment markers with the host's Python, not --python-version's: name what
# Debian's Python 3.11.2 needs beyond a later 3.11 (redis and valkey: async-timeout < 3.11.3).
"$python" -m pip download --quiet --only-binary=:all: --implementation cp --python-version 3.11 \
    "${platforms[@]}" --dest "$dir" "$dir"/issuer-*.whl "async-timeout>=4.0.3" "$@"
