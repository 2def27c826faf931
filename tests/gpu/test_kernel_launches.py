"""The layout refactor's point, checked on the GPU: BLNH in, no copy or transpose kernel.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

The profiler lists every CUDA kernel one forward + backward launches. varlen (BLNH in, TNH
or BLNH out) must launch none whose name says copy or transpose: its layout change is a view.
sdpa and flex transpose to (B, N, L, H) as views too; what their kernels copy (e.g. a
non-contiguous gradient) is printed for the record (docs/gpu-results.md).
"""

from __future__ import annotations

import re

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from dtensor_attn import AttentionConfig, Layout
from dtensor_attn.backends import REGISTRY
from dtensor_attn.config import Backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (profiles CUDA kernels)"),
]

COPY_KERNEL = re.compile(r"copy|transpose|contiguous", re.IGNORECASE)

CASES = [
    pytest.param(backend, out, id=f"{backend}-{out.name}")
    for backend in REGISTRY
    for out in ((Layout.BLNH, Layout.TNH) if backend is Backend.VARLEN else (Layout.BLNH,))
]


def _kernels(fn) -> list[str]:
    fn()  # warm-up: compilation and allocator out of the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("backend,out_layout", CASES)
def test_no_copy_kernels(backend, out_layout, capsys):
    config = AttentionConfig(
        backend=backend, enable_gqa=True,
        varlen_output=out_layout if out_layout is Layout.TNH else Layout.BLNH,
    )
    module = config.build()
    q_BLNH, k_BLNH, v_BLNH = (
        torch.randn(2, 512, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for n in (8, 8, 8)
    )

    def step():
        out = module(q_BLNH, k_BLNH, v_BLNH)
        out.backward(torch.ones_like(out))

    names = _kernels(step)
    copies = sorted({n for n in names if COPY_KERNEL.search(n)})
    with capsys.disabled():
        print(f"\n{backend}-{out_layout.name}: {len(names)} kernels; copy/transpose: {copies or 'none'}")
    if backend is Backend.VARLEN:
        assert copies == [], copies
