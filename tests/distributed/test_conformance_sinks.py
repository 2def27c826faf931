"""The kit on attention sinks through the LSE (gpt-oss): a dropped LSE gradient is a gradient
failure of q and k, never of v, also at the bf16 tolerance the GPU run uses.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

The subject is dtensor_attn's varlen with ``return_lse`` (its LSE gradient kept) under
``SinksAttention``; ``drop_lse_grad=True`` detaches the LSE, as torch's ``varlen_attn`` drops its
LSE gradient on GPU (tests/gpu/test_kit_cuda.py runs torch's own there).
"""

from __future__ import annotations

import pytest
import torch

from dtensor_attn import AttentionConfig, Layout, LocalMapAttention, make_attention_masks
from dtensor_attn.config import Backend
from dtensor_attn.testing.kit import HALF_TOLERANCE, CallingConvention, FailureKind, Status, check_attention
from dtensor_attn.testing.kit.sinks import SinksAttention, sink_rescale, sinks_transform

SINKS_N = torch.linspace(-1.0, 1.5, 8)  # one logit per q head; the lse is ~log(L) ~ 1..3


def _subject(drop: bool, gqa: bool = True):
    config = AttentionConfig(backend=Backend.VARLEN, return_lse=True, enable_gqa=gqa, varlen_output=Layout.BLNH)
    return SinksAttention(LocalMapAttention(config.build()), SINKS_N, drop_lse_grad=drop), config


def _convention(config) -> CallingConvention:
    return CallingConvention(make_mask=lambda positions_BL: make_attention_masks(config, positions_BL),
                             out_transform=sinks_transform(SINKS_N))


@pytest.mark.parametrize("tolerance", [None, HALF_TOLERANCE], ids=["float64", "bf16-tolerance"])
def test_sinks_with_the_lse_gradient_kept_pass_and_dropped_fail_on_q_and_k(tolerance):
    precision = {} if tolerance is None else dict(dtype=torch.float32, rtol=tolerance, atol=tolerance)
    narrow = dict(meshes=("tp2", "cp2"), gqa=(True,), cache_check=False, **precision)
    kept, config = _subject(drop=False)
    check_attention(kept, convention=_convention(config), **narrow).raise_for_failures()
    dropped, config = _subject(drop=True)
    result = check_attention(dropped, convention=_convention(config), **narrow)
    assert {c.status for c in result.cases} == {Status.FAIL}
    assert {(f.kind, f.what) for f in result.failures} == {(FailureKind.GRAD, "grad q"), (FailureKind.GRAD, "grad k")}


def test_without_the_transform_in_the_convention_the_outputs_differ():
    """The reference must apply the sinks too: without out_transform every output is 'wrong'."""
    kept, config = _subject(drop=False)
    result = check_attention(kept, make_mask=lambda p: make_attention_masks(config, p), meshes=("tp2",), gqa=(True,),
                             masks=("causal",), cache_check=False)
    assert (FailureKind.VALUES, "output (BLNH)") in {(f.kind, f.what) for f in result.failures}


def test_sink_rescale_is_gpt_oss_formula():
    out_BLNH, lse_BLN = torch.ones(1, 2, 3, 4), torch.zeros(1, 2, 3)
    sinks_N = torch.tensor([0.0, 100.0, -100.0])
    scaled = sink_rescale(out_BLNH, lse_BLN, sinks_N)
    assert torch.allclose(scaled[0, 0, :, 0], torch.tensor([0.5, 0.0, 1.0]))
    with pytest.raises(ValueError, match="expected BLN"):
        SinksAttention(lambda q, k, v, m: (q, q[..., 0].transpose(1, 2)), SINKS_N)(*(torch.zeros(1, 4, 8, 2),) * 3)
