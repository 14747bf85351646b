#!/bin/sh
# Builds the test fixtures (noop, trap, spin, hog) next to their .wat sources.
set -e
here=$(dirname "$0")
for f in "$here"/*.wat; do "${PYTHON:-python3}" "$here/../build_wat.py" "$f"; done
