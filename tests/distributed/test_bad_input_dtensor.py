"""Bad DTensor inputs to LocalMapAttention: each raises our error before any collective (no
k/v all-gather, no broadcast of sequence indices), never a crash inside torch or a silently wrong
result. The cases are exactly the ``dtensor-*`` rows of docs/bad-input.md
(tests/unit/test_bad_input.py has the others and checks the doc the same way).

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

Each case asserts the exception type, a regex naming the module, the expected and the actual
values (global shapes and head counts, never a rank's) and the fix, the doc row (type, first
words of the message, the function that raised it), and that no collective ran
(``CommDebugMode``, which counts them on simulated and torchrun ranks alike).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

from dtensor_attn import AttentionConfig, Layout, LocalMapAttention, PlacementError, apply_context_parallel, make_attention_masks
from dtensor_attn.testing.reference import make_mesh_inputs

from bad_input_doc import check_against_doc, doc_rows

DTENSOR_PREFIX = "dtensor-"
B, L, N, H = 2, 8, 4, 8
TP, CP, CPTP = (Shard(2),), (Shard(1),), (Shard(1), Shard(2))


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    mesh: dict[str, int]
    prepare: Callable[[object], Callable[[], object]]  # mesh -> the call that raises
    error: type[BaseException]
    match: str  # module, expected and actual values, fix


def _attention(backend: str = "sdpa", **config) -> LocalMapAttention:
    return LocalMapAttention(AttentionConfig(backend=backend, **config).build())


def _call(module, *args, **kwargs) -> Callable[[], object]:
    """The call under test; its inputs are made before (distributing them broadcasts)."""
    return lambda: module(*args, **kwargs)


def _inputs(mesh, **kwargs):
    defaults = dict(batch=B, seq=L, num_q_heads=N, num_kv_heads=N, head_dim=H)
    return make_mesh_inputs(mesh, **{**defaults, **kwargs})


def _qkv(mesh, placements, **kwargs):
    inputs = _inputs(mesh, **kwargs)
    return [distribute_tensor(t, mesh, placements) for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH)]


def _uneven(mesh, placements, tensors):
    """Distribute through Replicate: distribute_tensor itself may refuse uneven shards."""
    return [distribute_tensor(t, mesh, (Replicate(),) * mesh.ndim).redistribute(mesh, placements) for t in tensors]


def _mask(backend, positions_BL):
    return make_attention_masks(AttentionConfig(backend=backend), positions_BL)


def _with_mask(mesh, backend, placements, mask_of_positions):
    inputs = _inputs(mesh, documents=True)
    q, k, v = (distribute_tensor(t, mesh, placements) for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH))
    return _call(_attention(backend), q, k, v, mask_of_positions(inputs.positions_BL))


def _heads(mesh, num_q_heads, num_kv_heads, **config):
    inputs = _inputs(mesh, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads)
    return _call(_attention("sdpa", **config), *_uneven(mesh, TP, (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH)))


def _seq_6(mesh):
    inputs = _inputs(mesh, seq=6)
    qkv = _uneven(mesh, CP, (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH))
    return _call(_attention("varlen", varlen_output=Layout.TNH), *qkv)


def _kv_transform(mesh, placements, transform, backend="flex"):
    inputs = _inputs(mesh)
    q = distribute_tensor(inputs.q_BLNH, mesh, placements)
    k, v = (distribute_tensor(transform(t), mesh, placements) for t in (inputs.k_BLNH, inputs.v_BLNH))
    return _call(_attention(backend), q, k, v)


def _mixed(mesh):
    q, k, v = _qkv(mesh, TP)
    return _call(_attention(), q, k.full_tensor(), v.full_tensor())


def _partial_q(mesh):
    q, k, v = _qkv(mesh, (Replicate(),))
    return _call(_attention("flex"), DTensor.from_local(q.to_local(), mesh, (Partial(),)), k, v)


def _flat_q(mesh):
    q_BLD = distribute_tensor(_inputs(mesh).q_BLNH.flatten(2), mesh, TP)
    return _call(_attention(), q_BLD, *_qkv(mesh, TP)[1:])


def _two_placements(mesh, q_placements, kv_placements, v_placements=None):
    q, k, v = _qkv(mesh, q_placements)
    k, v = (t.redistribute(mesh, kv_placements) for t in (k, v))
    if v_placements is not None:
        v = v.redistribute(mesh, v_placements)
    return _call(_attention(), q, k, v)


def _other_meshes(mesh):
    q = _qkv(mesh, (Replicate(), Shard(2)))[0]
    return _call(_attention(), q, *_qkv(mesh["tp"], TP)[1:])


def _hooks_under_tp(mesh):
    """CP by torch's hooks on the inner module (cp axis), TP by LocalMapAttention (tp axis): q is
    a rank's seq chunk, so the mask must cover twice its length; this one is made from the chunk."""
    inputs = _inputs(mesh, documents=True)
    inner = AttentionConfig(backend="flex").build()
    apply_context_parallel(inner, mesh["cp"])
    qkv = [DTensor.from_local(distribute_tensor(t, mesh, CPTP).to_local(), mesh["tp"], TP)
           for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH)]
    return _call(LocalMapAttention(inner), *qkv, _mask("flex", inputs.positions_BL[:, : L // 2]))


class _DeclaredKernel(torch.nn.Module):
    """An inner attention that declares BLNH out (and optionally an LSE) and returns ``result(out)``."""

    in_layout = out_layout = Layout.BLNH
    is_causal = True

    def __init__(self, result, lse_layout=None):
        super().__init__()
        self.result, self.lse_layout = result, lse_layout
        self.sdpa = AttentionConfig(backend="sdpa").build()

    def forward(self, q, k, v, mask=None, **kwargs):
        return self.result(self.sdpa(q, k, v, mask, **kwargs))


def _kernel_returning(mesh, result, lse_layout=None):
    return _call(LocalMapAttention(_DeclaredKernel(result, lse_layout)), *_qkv(mesh, TP))


def _packed(out_BLNH):
    return out_BLNH.flatten(0, 1)


FIX = r".*Fix: .*"  # the fix, then what it must say
CASES = [
    # -- what LocalMapAttention takes -------------------------------------------------------
    Case("dtensor-mixed-with-plain", {"tp": 2}, _mixed, PlacementError,
         r"LocalMapAttention\(sdpa\): q, k and v must all be DTensors or all plain tensors, got q=DTensor, k=(Local)?Tensor, v=(Local)?Tensor" + FIX + r"distribute k and v on q's mesh"),
    Case("dtensor-keyword-dtensor", {"tp": 2}, lambda mesh: _call(_attention(), *_qkv(mesh, TP), q_seq_index_L=_qkv(mesh, TP)[0]), PlacementError,
         r"LocalMapAttention\(sdpa\): keyword argument 'q_seq_index_L' is a DTensor" + FIX + "pass it positionally"),
    Case("dtensor-unexpected-keyword", {"tp": 2}, lambda mesh: _call(_attention(), *_qkv(mesh, TP), window=3), TypeError,
         r"LocalMapAttention\(sdpa\): unexpected keyword arguments \['window'\] with DTensor inputs" + FIX + "drop them"),
    Case("dtensor-different-meshes", {"cp": 2, "tp": 2}, _other_meshes, PlacementError,
         r"LocalMapAttention\(sdpa\): q is on .* but k is on .*" + FIX + "put q, k and v on the same mesh"),
    Case("dtensor-wrong-ndim", {"tp": 2}, _flat_q, PlacementError,
         r"LocalMapAttention\(sdpa\): q must be BLNH \(4 dims\), got global shape \(2, 8, \d+\)" + FIX + "reshape to BLNH"),
    # -- placements -------------------------------------------------------------------------------
    Case("dtensor-partial", {"tp": 2}, _partial_q, PlacementError,
         r"LocalMapAttention\(flex\): q in BLNH has P\(sum\) on mesh axis 0 .*Expected Replicate, Shard\(0\), Shard\(1\) or Shard\(2\)" + FIX + "redistribute q to Replicate or Shard"),
    Case("dtensor-head-dim-sharded", {"tp": 2}, lambda mesh: _call(_attention("varlen"), *_qkv(mesh, (Shard(3),))), PlacementError,
         r"LocalMapAttention\(varlen\): q in BLNH has S\(3\) on mesh axis 0 .*head_dim is contracted" + FIX + r"shard heads \(Shard\(2\)\)"),
    Case("dtensor-kv-placements-differ", {"tp": 2}, lambda mesh: _two_placements(mesh, TP, (Replicate(),)), PlacementError,
         r"LocalMapAttention\(sdpa\): k/v placements must match q's in BLNH .*expected \(S\(2\)\), got \(R\)" + FIX + "distribute k and v with q's placements"),
    Case("dtensor-v-placements-differ", {"tp": 2}, lambda mesh: _two_placements(mesh, TP, TP, (Replicate(),)), PlacementError,
         r"LocalMapAttention\(sdpa\): k and v must have the same placements in BLNH; expected v \(S\(2\)\), got \(R\)" + FIX + "distribute v like k"),
    Case("dtensor-heads-not-divisible", {"tp": 4}, lambda mesh: _heads(mesh, 6, 2, enable_gqa=True), PlacementError,
         r"LocalMapAttention\(sdpa\): q has 6 heads in BLNH, not divisible by the 4 ranks of mesh axes \['tp'\]" + FIX + "divisible by 4"),
    Case("dtensor-seq-not-divisible", {"cp": 4}, _seq_6, PlacementError,
         r"LocalMapAttention\(varlen\): q has 6 seq in BLNH, not divisible by the 4 ranks of mesh axes \['cp'\]" + FIX),
    # -- shapes and dtypes, global -----------------------------------------------------------------
    Case("dtensor-gqa-not-a-multiple", {"tp": 2}, lambda mesh: _heads(mesh, 6, 4, enable_gqa=True), ValueError,
         r"LocalMapAttention\(sdpa\): q has 6 heads and k/v 4 \(global; heads sharded over mesh axes \['tp'\] of 2 ranks\); GQA needs q heads to be a multiple of k/v heads" + FIX + r"divisible by 2: 2 or 6"),
    Case("dtensor-gqa-without-flag", {"tp": 2}, lambda mesh: _heads(mesh, 8, 4), ValueError,
         r"LocalMapAttention\(sdpa\): q has 8 heads and k/v 4 \(global; .*\): that is GQA, but enable_gqa is False" + FIX + r"enable_gqa=True"),
    Case("dtensor-dtype-mismatch", {"cp": 2, "tp": 2}, lambda mesh: _kv_transform(mesh, CPTP, lambda t: t.float()), ValueError,
         r"LocalMapAttention\(flex\): q, k and v must share one dtype, got q torch\.\w+, k torch\.float32, v torch\.float32" + FIX + r"k\.to\(q\.dtype\)"),
    Case("dtensor-batch-mismatch", {"cp": 2}, lambda mesh: _kv_transform(mesh, CP, lambda t: t[:1], "varlen"), ValueError,
         r"LocalMapAttention\(varlen\): q has batch 2 but k/v batch 1 \(global\)" + FIX),
    Case("dtensor-head-dim-mismatch", {"tp": 2}, lambda mesh: _kv_transform(mesh, TP, lambda t: t[..., : t.shape[-1] // 2]), ValueError,
         r"LocalMapAttention\(flex\): q has head_dim (\d+) but k/v head_dim \d+ \(global\)" + FIX),
    Case("dtensor-seq-mismatch-under-cp", {"cp": 2}, lambda mesh: _kv_transform(mesh, CP, lambda t: t[:, :4]), ValueError,
         r"LocalMapAttention\(flex\): q has seq 8 but k/v seq 4 \(global\), with seq sharded over mesh axes \['cp'\]" + FIX),
    # -- masks -------------------------------------------------------------------------------------
    Case("dtensor-mask-bool-tensor", {"cp": 2, "tp": 2}, lambda mesh: _with_mask(mesh, "flex", CPTP, lambda p: torch.ones(B, L, dtype=torch.bool)), ValueError,
         r"LocalMapAttention\(flex\): FlexAttention \(flex\) was handed a (Local)?Tensor of shape \(2, 8\) and dtype torch\.bool as its mask; it applies FlexDocumentMask" + FIX + r"make_attention_masks\(config, positions\)"),
    Case("dtensor-mask-other-backend", {"cp": 2}, lambda mesh: _with_mask(mesh, "varlen", CP, lambda p: _mask("flex", p)), ValueError,
         r"LocalMapAttention\(varlen\): VarlenAttention \(varlen\) was handed a FlexDocumentMask as its mask; it applies VarlenDocumentMask" + FIX),
    Case("dtensor-mask-batch-1-tp", {"tp": 2}, lambda mesh: _with_mask(mesh, "flex", TP, lambda p: _mask("flex", p[:1])), ValueError,
         r"LocalMapAttention\(flex\): the mask's query document ids are \(batch, seq\) = \(1, 8\), but q is \(batch, seq\) = \(2, 8\) \(global\)" + FIX + r"positions_BL of shape \(2, 8\)"),
    Case("dtensor-mask-batch-1-cp", {"cp": 2}, lambda mesh: _with_mask(mesh, "varlen", CP, lambda p: _mask("varlen", p[:1])), ValueError,
         r"LocalMapAttention\(varlen\): the mask's query document ids are \(batch, seq\) = \(1, 8\), but q is \(batch, seq\) = \(2, 8\) \(global\)" + FIX),
    Case("dtensor-mask-from-local-positions", {"cp": 2}, lambda mesh: _with_mask(mesh, "flex", CP, lambda p: _mask("flex", p[:, : L // 2])), ValueError,
         r"LocalMapAttention\(flex\): the mask's query document ids are \(batch, seq\) = \(2, 4\), but q is \(batch, seq\) = \(2, 8\) \(global\)" + FIX + r"global positions"),
    Case("dtensor-mask-from-local-positions-hooks", {"cp": 2, "tp": 2}, _hooks_under_tp, ValueError,
         r"LocalMapAttention\(flex\): the mask's query document ids are \(batch, seq\) = \(2, 4\), but q is \(batch, seq\) = \(2, 8\) \(the whole sequence: 4 per rank x the 2 ranks of the context-parallel hooks\)" + FIX + r"global positions"),
    # -- what the kernel returns (checked inside local_map, after the kernel) ------------------------
    Case("dtensor-kernel-returns-tuple", {"tp": 2}, lambda mesh: _kernel_returning(mesh, lambda out: (out, out)), PlacementError,
         r"LocalMapAttention\(_DeclaredKernel\): the kernel returned a tuple of 2 where it declares one output \(out_layout BLNH, no lse_layout\)" + FIX),
    Case("dtensor-kernel-returns-packed", {"tp": 2}, lambda mesh: _kernel_returning(mesh, _packed), PlacementError,
         r"LocalMapAttention\(_DeclaredKernel\): the kernel returned a local output of shape \(16, 2, \d+\), but it declares BLNH, which for local q \(2, 8, 2, \d+\) is \(2, 8, 2, \d+\)" + FIX),
    Case("dtensor-kernel-lse-missing", {"tp": 2}, lambda mesh: _kernel_returning(mesh, lambda out: out, Layout.BNL), PlacementError,
         r"LocalMapAttention\(_DeclaredKernel\): the kernel declares an LSE \(lse_layout BNL\), so it must return \(out, lse\); got a (Local)?Tensor" + FIX),
]


def test_doc_rows_are_the_cases():
    documented = [i for i in doc_rows() if i.startswith(DTENSOR_PREFIX)]
    assert documented == [c.id for c in CASES], (
        f"docs/bad-input.md {DTENSOR_PREFIX}* rows and CASES differ: missing in the doc "
        f"{sorted({c.id for c in CASES} - set(documented))}, not a case {sorted(set(documented) - {c.id for c in CASES})}, "
        f"or in another order"
    )


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=pytest.mark.mesh(**c.mesh)) for c in CASES])
def test_bad_dtensor_input(case: Case, mesh):
    row = doc_rows()[case.id]
    call = case.prepare(mesh)
    with CommDebugMode() as comms, pytest.raises(case.error) as info:
        call()
    check_against_doc(row, case.match, info)
    assert comms.get_total_counts() == 0, f"collectives ran before the error: {dict(comms.get_comm_counts())}"


@pytest.mark.mesh(cp=2, tp=2)
def test_the_collective_count_sees_the_cp_gather(mesh):
    """The zero above means something: the same call with good inputs all-gathers k/v."""
    call = _with_mask(mesh, "flex", CPTP, lambda p: _mask("flex", p))
    with CommDebugMode() as comms:
        call()
    assert comms.get_total_counts() > 0
