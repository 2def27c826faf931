"""Bad inputs on plain tensors and configs: each one raises our error, never a crash inside torch
or a silently wrong result. The cases are exactly the rows of docs/bad-input.md without the
``dtensor-`` prefix (tests/distributed/test_bad_input_dtensor.py has those).

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

Each case asserts the exception type, a regex naming the module, the expected and the actual
values and the fix, and the doc row: the same type, the message's first words, and the function
that raised it (``caught in``, found in the traceback).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch

from dtensor_attn import AttentionConfig, Kernel, Layout, LocalMapAttention, make_attention_masks
from dtensor_attn.backends import REGISTRY, FlexAttention, FlexDocumentMask, SDPAAttention
from dtensor_attn.testing.reference import make_inputs

from bad_input_doc import check_against_doc, doc_rows

DTENSOR_PREFIX = "dtensor-"  # rows of the distributed counterpart


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[], object]
    error: type[BaseException]
    match: str  # module, expected and actual values, fix


def _qkv(**kwargs):
    inputs = make_inputs(**kwargs)
    return inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH


def _run(backend: str, q, k, v, mask=None, **config):
    return AttentionConfig(backend=backend, **config).build()(q, k, v, mask)


def _documents(backend: str, batch: int = 2, seq: int = 8):
    positions_BL = make_inputs(documents=True, batch=batch, seq=seq).positions_BL
    return make_attention_masks(AttentionConfig(backend=backend), positions_BL)


def _dtype_mismatch(backend):
    q, k, v = _qkv()
    return _run(backend, q.bfloat16(), k.float(), v.float())


def _batch_mismatch(backend):
    q, k, v = _qkv()
    return _run(backend, q, k[:1], v[:1])


def _head_dim_mismatch():
    q, k, v = _qkv()
    return _run("flex", q, k[..., :4], v[..., :4])


def _mask_batch_one(backend):
    q, k, v = _qkv(documents=True)
    return _run(backend, q, k, v, _documents(backend, batch=1))


def _mask_kv_length():
    q, k, v = _qkv()
    ids_BL = torch.ones(2, 8, dtype=torch.int32)
    return _run("flex", q, k, v, FlexDocumentMask(q_document_ids_BL=ids_BL, kv_document_ids_BL=ids_BL[:, :6]))


FIX = r".*Fix: .*"  # the fix, then what it must say
CASES = [
    # -- AttentionConfig -------------------------------------------------------------------
    Case("config-backend-none", lambda: AttentionConfig(backend=None), ValueError,
         r"AttentionConfig: unknown backend None; expected one of sdpa, flex, varlen" + FIX + r"AttentionConfig\(backend='flex'\)"),
    Case("config-backend-unknown", lambda: AttentionConfig(backend="flash"), ValueError,
         r"AttentionConfig: unknown backend 'flash'; expected one of sdpa, flex, varlen" + FIX),
    Case("config-layout-packed", lambda: AttentionConfig(backend="varlen", layout=Layout.TNH), ValueError,
         r"AttentionConfig: layout must be Layout\.BLNH or the legacy Layout\.BNLH, got Layout\.TNH" + FIX + r"varlen_output=Layout\.TNH"),
    Case("config-varlen-output-string", lambda: AttentionConfig(backend="varlen", varlen_output="TNH"), ValueError,
         r"AttentionConfig: varlen_output must be Layout\.BLNH or Layout\.TNH, got 'TNH'" + FIX + r"varlen_output=Layout\.TNH"),
    Case("config-packed-output-not-varlen", lambda: AttentionConfig(backend="flex", varlen_output=Layout.TNH), ValueError,
         r"AttentionConfig: varlen_output=Layout\.TNH needs backend varlen, got flex" + FIX + "backend='varlen'"),
    Case("config-scale-zero", lambda: AttentionConfig(backend="sdpa", scale=0.0), ValueError,
         r"AttentionConfig: scale must be a positive finite number or None, got 0\.0" + FIX + r"scale=None"),
    Case("config-scale-string", lambda: AttentionConfig(backend="sdpa", scale="0.125"), ValueError,
         r"AttentionConfig: scale must be a positive finite number or None, got '0\.125'" + FIX),
    Case("config-scale-nan", lambda: AttentionConfig(backend="sdpa", scale=float("nan")), ValueError,
         r"AttentionConfig: scale must be a positive finite number or None, got nan" + FIX),
    Case("config-flag-not-bool", lambda: AttentionConfig(backend="sdpa", is_causal="yes"), ValueError,
         r"AttentionConfig: is_causal must be True or False, got 'yes'" + FIX + r"is_causal=True"),
    Case("config-kernel-string", lambda: AttentionConfig(backend="flex", kernel="math"), ValueError,
         r"AttentionConfig: kernel must be one of Kernel\.AUTO, Kernel\.NATIVE, Kernel\.MATH, got 'math'" + FIX + r"kernel=Kernel\.MATH"),
    # -- building the inner attention --------------------------------------------------------
    Case("build-config-mismatch", lambda: SDPAAttention(AttentionConfig(backend="flex")), ValueError,
         r"SDPAAttention is the sdpa backend, but the config says flex" + FIX + r"config\.build\(\)"),
    Case("build-not-a-config", lambda: FlexAttention("flex"), TypeError,
         r"FlexAttention takes an AttentionConfig, got str \('flex'\)" + FIX + r"AttentionConfig\(backend='flex'\)\.build\(\)"),
    Case("kernel-native-unavailable", lambda: _run("varlen", *_qkv(), kernel=Kernel.NATIVE), RuntimeError,
         r"VarlenAttention: Kernel\.NATIVE asked for, but torch has no varlen kernel for cpu" + FIX + r"Kernel\.AUTO or Kernel\.MATH"),
    Case("wrapper-inner-without-layouts", lambda: LocalMapAttention(torch.nn.Linear(2, 2)), TypeError,
         r"LocalMapAttention needs an inner attention that follows InnerAttentionProtocol \(declares in_layout, out_layout, lse_layout, is_causal and takes visibility=\); Linear lacks in_layout, out_layout, lse_layout, is_causal, forward" + FIX),
    Case("wrapper-seq-order-string", lambda: LocalMapAttention(AttentionConfig(backend="sdpa").build(), seq_order="head_tail"), ValueError,
         r"LocalMapAttention\(sdpa\): seq_order must be SeqOrder\.CONTIGUOUS or SeqOrder\.HEAD_TAIL, got 'head_tail'" + FIX + r"SeqOrder\.HEAD_TAIL"),
    # -- make_attention_masks ----------------------------------------------------------------
    Case("masks-config-not-config", lambda: make_attention_masks("flex", torch.zeros(2, 8, dtype=torch.long)), TypeError,
         r"make_attention_masks: config must be an AttentionConfig, got str \('flex'\)" + FIX + r"AttentionConfig\(backend='flex'\)"),
    Case("masks-positions-list", lambda: make_attention_masks(AttentionConfig(backend="flex"), [[0, 1, 2, 0]]), TypeError,
         r"make_attention_masks: positions_BL must be a \(batch, seq\) tensor or None, got list" + FIX + r"torch\.tensor"),
    Case("masks-positions-1d", lambda: make_attention_masks(AttentionConfig(backend="flex"), torch.arange(8)), ValueError,
         r"make_attention_masks: positions_BL must be \(batch, seq\), got shape \(8,\)" + FIX + r"positions_BL\[None\]"),
    Case("masks-sdpa-documents", lambda: _documents("sdpa"), ValueError,
         r"make_attention_masks: sdpa cannot apply packed-document masks: positions restart at 0 inside row 0 \(at seq index 2\)" + FIX + "'flex' or 'varlen'"),
    # -- q, k, v (every backend runs the same checks: test_every_backend_checks_its_inputs) -----
    Case("qkv-not-a-tensor", lambda: _run("sdpa", [[1.0]], *_qkv()[1:]), TypeError,
         r"SDPAAttention: q must be a tensor in BLNH \(batch, seq, heads, head_dim\), got list" + FIX),
    Case("qkv-wrong-ndim", lambda: _run("flex", _qkv()[0].flatten(2), *_qkv()[1:]), ValueError,
         r"FlexAttention: q must be BLNH \(4 dims: batch, seq, heads, head_dim\), got shape \(2, 8, 64\)" + FIX),
    Case("qkv-integer-dtype", lambda: _run("sdpa", *(t.long() for t in _qkv())), ValueError,
         r"SDPAAttention: q, k and v must be floating point, got q torch\.int64, k torch\.int64, v torch\.int64" + FIX),
    Case("qkv-dtype-mismatch-flex", lambda: _dtype_mismatch("flex"), ValueError,
         r"FlexAttention: q, k and v must share one dtype, got q torch\.bfloat16, k torch\.float32, v torch\.float32" + FIX + r"k\.to\(q\.dtype\)"),
    Case("qkv-dtype-mismatch-varlen", lambda: _dtype_mismatch("varlen"), ValueError,
         r"VarlenAttention: q, k and v must share one dtype, got q torch\.bfloat16, k torch\.float32, v torch\.float32" + FIX),
    Case("qkv-device-mismatch", lambda: _run("flex", _qkv()[0], *(t.to("meta") for t in _qkv()[1:])), ValueError,
         r"FlexAttention: q, k and v must be on one device, got q cpu, k meta, v meta" + FIX + r"k\.to\(q\.device\)"),
    Case("qkv-kv-shapes-differ", lambda: _run("flex", *_qkv()[:2], _qkv()[2][..., :4]), ValueError,
         r"FlexAttention: k and v must have the same shape, got k \(2, 8, 8, 8\), v \(2, 8, 8, 4\)" + FIX),
    Case("qkv-batch-mismatch-varlen", lambda: _batch_mismatch("varlen"), ValueError,
         r"VarlenAttention: q has batch 2 but k/v batch 1; each batch row attends to its own keys" + FIX + r"expand\(2, -1, -1, -1\)"),
    Case("qkv-batch-mismatch-sdpa", lambda: _batch_mismatch("sdpa"), ValueError,
         r"SDPAAttention: q has batch 2 but k/v batch 1" + FIX),
    Case("qkv-head-dim-mismatch", _head_dim_mismatch, ValueError,
         r"FlexAttention: q has head_dim 8 but k/v head_dim 4" + FIX),
    Case("gqa-without-flag", lambda: _run("varlen", *_qkv(num_q_heads=8, num_kv_heads=4)), ValueError,
         r"VarlenAttention: q has 8 heads and k/v 4: that is GQA, but enable_gqa is False" + FIX + r"enable_gqa=True"),
    Case("gqa-heads-not-a-multiple", lambda: _run("flex", *_qkv(num_q_heads=6, num_kv_heads=4), enable_gqa=True), ValueError,
         r"FlexAttention: q has 6 heads and k/v 4; GQA needs q heads to be a multiple of k/v heads" + FIX + r"1, 2, 3 or 6"),
    # -- masks ---------------------------------------------------------------------------------
    Case("mask-bool-tensor", lambda: _run("flex", *_qkv(), torch.ones(2, 8, 8, dtype=torch.bool)), ValueError,
         r"FlexAttention \(flex\) was handed a Tensor of shape \(2, 8, 8\) and dtype torch\.bool as its mask; it applies FlexDocumentMask" + FIX + r"make_attention_masks\(config, positions\)"),
    Case("mask-for-sdpa", lambda: _run("sdpa", *_qkv(documents=True), _documents("flex")), ValueError,
         r"SDPAAttention \(sdpa\) was handed a FlexDocumentMask as its mask; it applies no masks" + FIX + r"mask=None"),
    Case("mask-other-backend", lambda: _run("varlen", *_qkv(documents=True), _documents("flex")), ValueError,
         r"VarlenAttention \(varlen\) was handed a FlexDocumentMask as its mask; it applies VarlenDocumentMask" + FIX + r"make_attention_masks"),
    Case("mask-ids-not-a-tensor", lambda: _run("flex", *_qkv(), FlexDocumentMask(q_document_ids_BL=[[1] * 8] * 2, kv_document_ids_BL=[[1] * 8] * 2)), ValueError,
         r"FlexAttention \(flex\) was handed a FlexDocumentMask whose q_document_ids_BL is a list; expected a \(batch, seq\) tensor" + FIX),
    Case("mask-batch-1-flex", lambda: _mask_batch_one("flex"), ValueError,
         r"FlexAttention: the mask's query document ids are \(batch, seq\) = \(1, 8\), but q is \(batch, seq\) = \(2, 8\)" + FIX + r"positions_BL of shape \(2, 8\)"),
    Case("mask-batch-1-varlen", lambda: _mask_batch_one("varlen"), ValueError,
         r"VarlenAttention: the mask's query document ids are \(batch, seq\) = \(1, 8\), but q is \(batch, seq\) = \(2, 8\)" + FIX),
    Case("mask-seq-length", lambda: _run("flex", *_qkv(documents=True), _documents("flex", seq=6)), ValueError,
         r"FlexAttention: the mask's query document ids are \(batch, seq\) = \(2, 6\), but q is \(batch, seq\) = \(2, 8\)" + FIX),
    Case("mask-kv-seq-length", _mask_kv_length, ValueError,
         r"FlexAttention: the mask's key/value document ids are \(batch, seq\) = \(2, 6\), but k/v are \(batch, seq\) = \(2, 8\)" + FIX),
]


# -- the doc's table ---------------------------------------------------------------------------


def test_doc_rows_are_the_cases():
    documented = [i for i in doc_rows() if not i.startswith(DTENSOR_PREFIX)]
    assert documented == [c.id for c in CASES], (
        f"docs/bad-input.md rows (without {DTENSOR_PREFIX}*) and CASES differ: missing in the doc "
        f"{sorted({c.id for c in CASES} - set(documented))}, not a case {sorted(set(documented) - {c.id for c in CASES})}, "
        f"or in another order"
    )
    assert len(doc_rows()) >= 30


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case: Case):
    row = doc_rows()[case.id]
    with pytest.raises(case.error) as info:
        case.call()
    check_against_doc(row, case.match, info)


SHARED_CHECKS = {
    "dtype": (_dtype_mismatch, r"q, k and v must share one dtype"),
    "batch": (_batch_mismatch, r"q has batch 2 but k/v batch 1"),
    "mask-batch": (_mask_batch_one, r"the mask's query document ids are \(batch, seq\) = \(1, 8\)"),
}


@pytest.mark.parametrize("check", list(SHARED_CHECKS))
@pytest.mark.parametrize("backend", [str(b) for b in REGISTRY])
def test_every_backend_checks_its_inputs(backend, check):
    """The table names one backend per check; the check is shared, so every backend raises it."""
    make, match = SHARED_CHECKS[check]
    if check == "mask-batch" and REGISTRY[AttentionConfig(backend=backend).backend].mask_type is None:
        pytest.skip(f"{backend} takes no document masks (row masks-sdpa-documents)")
    with pytest.raises(ValueError, match=match):
        make(backend)


def test_valid_inputs_still_pass_the_checks():
    """Cross-attention lengths (q and k/v seq differ) and legacy BNLH stay allowed."""
    q, k, v = _qkv(seq=8)
    out = _run("flex", q, k[:, :6], v[:, :6])
    assert out.shape == q.shape
    mask = _documents("varlen")
    out = _run("varlen", *(t.transpose(1, 2) for t in _qkv(documents=True)), mask, layout=Layout.BNLH)
    assert out.shape == (2, 8, 8, 8)
