#!/usr/bin/env bash
# Install voxaffect's dependencies (not the project itself) into the environment of $PIP:
# torch first, from $TORCH_INDEX if set, so nothing else pulls a different build; then every
# dependency listed in pyproject.toml (pip's cache: as pip is configured; the image sets
# PIP_NO_CACHE_DIR). The Dockerfile runs this before copying the source, so the
# dependency layer is cached; tests/ops/test_deploy.py runs it in a fresh venv.
set -euo pipefail
PIP=${PIP:-pip}
TORCH=${TORCH:-torch==2.13.0}
PYTHON=${PYTHON:-$(dirname "$(command -v "$PIP")")/python}
here=$(cd "$(dirname "$0")" && pwd)
pyproject=${PYPROJECT:-$here/../pyproject.toml}
[ -f "$pyproject" ] || pyproject=$here/pyproject.toml
if [ -n "${TORCH_INDEX:-}" ]; then
  "$PIP" install "$TORCH" --index-url "$TORCH_INDEX"
else
  "$PIP" install "$TORCH"
fi
requirements=$(mktemp)
"$PYTHON" - "$pyproject" "$@" > "$requirements" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
deps = list(project["dependencies"])
for extra in sys.argv[2:]:
    deps += project["optional-dependencies"][extra]
print("\n".join(deps))
PY
"$PIP" install -r "$requirements"
rm -f "$requirements"
