"""The conformance kit with device="cuda": simulated ranks on one GPU, the real kernels, bf16.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

Run: ``python3 -m pytest tests/gpu/test_kit_cuda.py -v`` (skips without CUDA). Tolerance: the
kit's bf16 default, HALF_TOLERANCE (options.py: inputs rounded to bf16, float64 reference
from the same values, absolute part scaled by max|reference|). The sinks cases: gpt-oss
rescales attention's output by sigmoid(lse - sink), so q/k gradients flow through the LSE;
dtensor_attn's varlen with return_lse keeps that gradient, torch's varlen_attn drops it on GPU.
"""

from __future__ import annotations

import pytest
import torch

from dtensor_attn import AttentionConfig, Layout, LocalMapAttention, make_attention_masks
from dtensor_attn.backends import REGISTRY
from dtensor_attn.config import Backend
from dtensor_attn.testing.kit import CallingConvention, FailureKind, Shapes, Status, check_attention
from dtensor_attn.testing.kit.sinks import SinksAttention, sinks_transform
from dtensor_attn.testing.kit.torch_varlen import TorchVarlenWithLse

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the kit's device='cuda')")

SHAPES = Shapes(batch=2, seq=256, num_q_heads=8, num_kv_heads_gqa=4, head_dim=64)
SINKS_N = torch.linspace(-1.0, 1.5, 8)


@pytest.mark.parametrize("backend", list(REGISTRY), ids=str)
def test_local_map_attention_conforms_on_cuda_simulated_ranks(backend):
    result = check_attention(factory=lambda config: LocalMapAttention(config.build()), backends=[backend],
                             outputs=[Layout.BLNH], meshes=("tp1", "tp2", "cp2", "cp2xtp2"), shapes=SHAPES, device="cuda")
    print(result)
    result.raise_for_failures(allow_not_exercised=True)
    assert result.with_status(Status.PASS)


def _sinks_convention(config) -> CallingConvention:
    return CallingConvention(make_mask=lambda positions_BL: make_attention_masks(config, positions_BL),
                             out_transform=sinks_transform(SINKS_N))


def test_sinks_on_dtensor_attn_varlen_keep_the_lse_gradient():
    config = AttentionConfig(backend=Backend.VARLEN, return_lse=True, enable_gqa=True, varlen_output=Layout.BLNH)
    subject = SinksAttention(LocalMapAttention(config.build()), SINKS_N)
    result = check_attention(subject, convention=_sinks_convention(config), meshes=("tp1", "tp2"), gqa=(True,),
                             shapes=SHAPES, device="cuda", cache_check=False)
    print(result)
    result.raise_for_failures()


def test_sinks_on_torchs_varlen_attn_report_its_dropped_lse_gradient():
    """torch's varlen_attn (as torchtitan's VarlenAttention calls it) under gpt-oss's sinks: the kit
    reports the q and k gradients wrong, v's right (its gradient does not pass through the LSE).
    The mask is the global positions: the subject builds its own cu_seqlens from them."""
    subject = SinksAttention(TorchVarlenWithLse(), SINKS_N)
    result = check_attention(subject, convention=CallingConvention(make_mask=lambda positions_BL: positions_BL,
                                                                   out_transform=sinks_transform(SINKS_N)),
                             meshes=("tp1", "tp2"), gqa=(False, True), shapes=SHAPES, device="cuda", cache_check=False)
    print(result)
    assert not [f for f in result.failures if f.kind is not FailureKind.GRAD], result.table()
    assert {f.what for f in result.failures} == {"grad q", "grad k"}, str(result)
