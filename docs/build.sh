#!/usr/bin/env bash
# Build the HTML documentation with warnings as errors; the tutorials execute unless STPREDICT_DOCS_EXECUTE=0.
#
#   docs/build.sh                            # from the repository root: full build, runs every tutorial
#   STPREDICT_DOCS_EXECUTE=0 docs/build.sh   # quick check: pages and API only, notebooks not run
#
# Uses .venv/bin/python when it exists (else python3); extra arguments go to sphinx-build (e.g. -E for a clean build).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python=python3
cd "$root"
exec "$python" -m sphinx -W --keep-going -b html "$@" docs docs/_build/html
