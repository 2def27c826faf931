#!/usr/bin/env bash
# Everything docs/gpu-results.md records, in one call on a GPU machine (no network there):
# the GPU-only tests (real kernels, kernel launches), the distributed suite under torchrun with
# NCCL on all GPUs, the whole simulated suite and the harness's own tests on that machine's
# torch (CPU meshes), the distributed suite on simulated ranks all on the one GPU (CUDA meshes:
# flash sdpa and torch's ring attention at any world size), the wrapper-overhead benchmark
# (after what one Python autograd node costs, its floor), the cost of varlen's LSE gradient,
# and with 2 or more GPUs the CP benchmark (CP=2 against one GPU at 32k tokens, ring and
# all-gather). Full logs go to $OUT (or out/gpu); the console gets each step's summary.
#
# usage: bash benchmarks/gpu_run.sh [STEP...]
#        steps: gpu torchrun simulated simulated-cuda wrapper lse cp (default: all)
#        (carry .whl with an expecttest wheel: see docs/gpu-results.md)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
steps=("${@:-gpu torchrun simulated simulated-cuda wrapper lse cp}")
steps=" ${steps[*]} "
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
# Offline: no build isolation (it would download setuptools), no dependency resolution.
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || cat "$out/install.log"
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")

if [[ $steps == *" gpu "* ]]; then
  echo "=== GPU tests (real kernels, launches)"
  python3 -m pytest tests/gpu -q -rs -s >"$out/gpu-tests.log" 2>&1
  grep -E "kernels;|passed|failed|SKIPPED|FAILED" "$out/gpu-tests.log"
fi
if [[ $steps == *" torchrun "* ]]; then
  echo "=== torchrun, $ngpu GPU(s), NCCL"
  scripts/run_torchrun.sh -n "$ngpu" --backend nccl --out /tmp/torchrun-nccl >"$out/torchrun-nccl.log" 2>&1
  tail -25 "$out/torchrun-nccl.log"
fi
if [[ $steps == *" simulated "* ]]; then
  echo "=== simulated suite on this machine's torch"
  python3 -m pytest -q -n 8 -p no:randomly -rfs --tb=short tests/unit tests/distributed tests/harness >"$out/simulated.log" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$out/simulated.log" | tail -40
fi
if [[ $steps == *" simulated-cuda "* ]]; then
  echo "=== distributed suite on simulated ranks, CUDA meshes (every rank on GPU 0)"
  python3 -m pytest -q -n 4 -p no:randomly -rfs --tb=short --dtensor-device cuda tests/distributed \
    tests/harness/test_plugin_simulated.py >"$out/simulated-cuda.log" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$out/simulated-cuda.log" | tail -40
fi
if [[ $steps == *" wrapper "* ]]; then
  echo "=== one Python autograd node: the floor under any DTensor boundary"
  python3 benchmarks/autograd_node_cost.py 2>&1 | tee "$out/autograd-node-cost.log" | grep -E "^\||^#"
  for run in 1 2 3; do  # three runs of the same tree: only ratios within one run compare
    echo "=== wrapper overhead, run $run"
    torchrun --standalone --nproc-per-node 1 benchmarks/wrapper_overhead.py --shard-heads 2 2>&1 | tee "$out/wrapper-overhead-$run.log" | grep -E "^\||^#"
  done
fi
if [[ $steps == *" lse "* ]]; then
  echo "=== varlen LSE gradient cost"
  python3 benchmarks/varlen_lse_grad.py 2>&1 | tee "$out/varlen-lse-grad.log" | grep -E "^\||^#"
fi
if [[ $steps == *" cp "* ]]; then
  echo "=== CP benchmark (2 GPUs, NCCL)"
  if ((ngpu >= 2)); then
    torchrun --standalone --nproc-per-node 2 benchmarks/cp_benchmark.py 2>&1 | tee "$out/cp-benchmark.log" | grep -vE "^W[0-9]|^\*+$"
  else
    echo "skipped: needs 2 GPUs, this machine has $ngpu"
  fi
fi
