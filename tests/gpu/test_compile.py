"""LocalMapAttention under torch.compile (inductor) on a 1-rank NCCL mesh: eager's values and grads.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

Each backend and output layout, with and without the LSE (varlen's LSE path is our own
autograd function around torch's ops), compiled with ``fullgraph=True`` (a graph break fails)
and without. The run is a torchrun child process, so that its process group never meets the
simulated one of the rest of the session.

Tolerance: the same kernels run compiled and eager; inductor may fuse the surrounding views and
casts differently, so bf16 outputs and gradients agree to a few bf16 ulps: 2e-2.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (inductor, NCCL)"),
]

SCRIPT = r"""
import sys
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from dtensor_attn import AttentionConfig, Layout, LocalMapAttention

dist.init_process_group("nccl")
torch.cuda.set_device(0)
mesh = init_device_mesh("cuda", (1,), mesh_dim_names=("tp",))
gen = torch.Generator(device="cuda").manual_seed(0)
shapes = [(2, 256, 8, 64), (2, 256, 4, 64), (2, 256, 4, 64)]  # B, L, N, H: q, k, v (GQA)
globals_ = [torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=gen) for s in shapes]
failed = 0
for case in sys.argv[1:]:
    backend, layout, lse, graph = case.split("-")
    config = AttentionConfig(backend=backend, enable_gqa=True, return_lse=lse == "lse",
                             varlen_output=Layout[layout] if backend == "varlen" else Layout.BLNH)
    module = LocalMapAttention(config.build())
    torch._dynamo.reset()
    results = []
    try:
        for fn in (module, torch.compile(module, fullgraph=graph == "fullgraph")):
            leaves = [DTensor.from_local(t.clone(), mesh, (Shard(2),)).requires_grad_() for t in globals_]
            out = fn(*leaves)
            outs = out if lse == "lse" else (out,)
            loss = sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs))
            loss.backward()
            results.append([o.full_tensor().float() for o in outs] + [x.grad.full_tensor().float() for x in leaves])
    except Exception as error:  # one line per case, the run goes on
        failed += 1
        print(f"{case}: FAILED {type(error).__name__}: {str(error).splitlines()[0][:300]}", flush=True)
        continue
    worst = max(float((c - e).abs().max() / e.abs().max().clamp_min(1e-6)) for e, c in zip(*results))
    ok = worst < 2e-2
    failed += not ok
    print(f"{case}: {'ok' if ok else 'FAILED'} max relative error compiled vs eager {worst:.2e}", flush=True)
dist.destroy_process_group()
sys.exit(1 if failed else 0)
"""

CASES = [
    f"{backend}-{layout}-{lse}-{graph}"
    for backend, layout in (("sdpa", "BLNH"), ("flex", "BLNH"), ("varlen", "BLNH"), ("varlen", "TNH"))
    for lse in ("out", "lse")
    for graph in ("fullgraph", "graphs")
    if graph == "fullgraph" or lse == "lse"  # one run that may break graphs per backend and layout
]


def test_compiled_local_map_attention_equals_eager(tmp_path):
    """One torchrun child for every case (compiling is the cost); each case prints one line."""
    script = tmp_path / "compile_check.py"
    script.write_text(SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               str(script), *CASES]
    result = subprocess.run(command, capture_output=True, text=True, timeout=540)
    print(result.stdout)
    lines = {line.split(":")[0]: line for line in result.stdout.splitlines() if line.split(":")[0] in CASES}
    assert sorted(lines) == sorted(CASES), result.stdout[-3000:] + result.stderr[-6000:]
    failures = [line for line in lines.values() if ": ok " not in line]
    assert not failures and result.returncode == 0, "\n".join(failures) + result.stderr[-4000:]
