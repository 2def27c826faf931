#!/usr/bin/env bash
# The README's test command and the torchrun suite (2 and 4 gloo ranks) on another torch
# release, in a virtual environment of its own (a temporary folder, deleted afterwards).
# CI runs it for torch 2.11, the GPU machines' release, beside its main run on 2.13: simulated
# ranks are only as strict as the torch under them (a collective that 2.13 accepts and 2.11
# refuses passed here and failed there).
#
# usage: bash scripts/torch_compat.sh VERSION      e.g. 2.11.0
#        (PyPI's wheel: a CUDA build, about 4.6 GB installed, which runs on the CPU)
# Exit status: non-zero if the install, the tests or either torchrun run failed.
set -uo pipefail

cd "$(dirname "$0")/.."
version=${1:?usage: bash scripts/torch_compat.sh VERSION (e.g. 2.11.0)}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/venv" || exit 1
# shellcheck disable=SC1091
source "$scratch/venv/bin/activate" || exit 1
python3 -m pip install -q "torch==$version" || { echo "torch_compat.sh: cannot install torch==$version"; exit 1; }
bash scripts/setup.sh || exit 1
python3 -c "import torch; print('torch_compat.sh: torch', torch.__version__, 'in', torch.__file__)"

failed=()
python3 -m pytest -n 2 || failed+=("tests")
for n in 2 4; do
  scripts/run_torchrun.sh -n "$n" --backend gloo --out "out/compat-$version-torchrun-$n" \
    || failed+=("torchrun-$n")
done
if ((${#failed[@]})); then
  echo "torch_compat.sh: torch $version: FAILED: ${failed[*]}"
  exit 1
fi
echo "torch_compat.sh: torch $version: tests, torchrun-2 and torchrun-4 passed"
