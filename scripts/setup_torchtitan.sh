#!/usr/bin/env bash
# Installs torchtitan 0.3.0 as examples/torchtitan_conformance.py needs it: the fewest packages
# that let `torchtitan.models.common.attention` and `.decoder_sharding` import, each with
# --no-deps (torchtitan's own requirements would replace the installed torch). Measured
# (docs/kit.md): spmd_types and tyro are imported by torchtitan, tyro imports docstring_parser,
# the attention module imports triton. Needs torch already installed (scripts/setup.sh).
set -euo pipefail
python3 -m pip install --no-deps \
  torchtitan==0.3.0 spmd_types==0.2.3 tyro==1.0.17 docstring_parser==0.18.0 triton==3.9.0
python3 -c "import torchtitan.models.common.attention, torchtitan.models.common.decoder_sharding; print('torchtitan', __import__('torchtitan').__version__ if hasattr(__import__('torchtitan'), '__version__') else '0.3.0', 'imports')"
