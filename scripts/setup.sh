#!/usr/bin/env bash
# Install what dtensor_attn needs, without ever replacing a torch that is already installed.
#
# usage: bash scripts/setup.sh        (PYTHON=python3.11 bash scripts/setup.sh for another one)
#        bash scripts/setup.sh --dry-run   (print the install it would run; install nothing)
#
# - no torch importable: install torch==2.13.0 (not whatever newest release a bare "torch"
#   requirement would pull);
# - then the package in editable mode with its test dependencies (pytest, pytest-xdist,
#   expecttest, and the `test` extra: numpy), with the installed torch pinned so that pip
#   cannot swap it;
# - quick and idempotent: one Python start-up, and nothing to do when all is in place.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
default_torch=2.13.0  # installed only where no torch is
dry_run=0
case ${1:-} in
  "") ;;
  --dry-run) dry_run=1 ;;
  *) echo "setup.sh: unknown argument '$1' (usage: bash scripts/setup.sh [--dry-run])" >&2; exit 2 ;;
esac

# Prints "no-torch", or "<torch version> ok" when this checkout is installed with its plugin
# and test dependencies, or "<torch version> install" otherwise. The version is the installed
# distribution's, which pip compares: PyPI's CUDA wheels say "2.11.0" there while
# torch.__version__ says "2.11.0+cu130", and a pin on the latter matches no distribution.
state=$("$PYTHON" - "$PWD" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, entry_points, version
from importlib.util import find_spec
from pathlib import Path

try:
    import torch
except ImportError:
    print("no-torch")
    sys.exit()
ready = all(find_spec(name) for name in ("pytest", "xdist", "expecttest", "numpy"))
try:
    version("dtensor_attn")
    spec = find_spec("dtensor_attn")
    here = Path(spec.origin).resolve().parents[1] == Path(sys.argv[1]).resolve()
    plugin = any(ep.value == "dtensor_attn.testing.harness.plugin" for ep in entry_points(group="pytest11"))
    ready = ready and here and plugin and int(version("pytest").split(".")[0]) >= 8
except PackageNotFoundError:
    ready = False
try:
    pin = version("torch")
except PackageNotFoundError:  # a torch without metadata (on PYTHONPATH): pip then fails, never swaps it
    pin = torch.__version__
print(pin, "ok" if ready else "install")
PY
)

if [[ $dry_run == 1 ]]; then
  [[ $state == no-torch ]] && echo "setup.sh: would run: $PYTHON -m pip install torch==$default_torch" \
    && state="$default_torch install"
  install="$PYTHON -m pip install -c <(echo torch==${state% *}) -e .[test]"
  [[ $state == *" ok" ]] && echo "setup.sh: nothing to do (all installed); an install would run: $install" \
    || echo "setup.sh: would run: $install"
  exit 0
fi
if [[ $state == no-torch ]]; then
  echo "setup.sh: no torch importable by $PYTHON; installing torch==$default_torch"
  "$PYTHON" -m pip install "torch==$default_torch"
  state="$("$PYTHON" -c 'from importlib.metadata import version; print(version("torch"))') install"
fi
torch_version=${state% *}
if [[ $state == *" ok" ]]; then
  echo "setup.sh: dtensor_attn (this checkout), torch $torch_version, pytest, pytest-xdist, expecttest and numpy already installed"
  exit 0
fi

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" > "$constraints"  # keep the user's torch: fail rather than swap it
echo "setup.sh: installing dtensor_attn (editable) and its test dependencies; torch $torch_version kept"
"$PYTHON" -m pip install -c "$constraints" -e ".[test]"
