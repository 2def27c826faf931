"""The conformance kit: it passes LocalMapAttention everywhere and flags every docs/bugs.md row.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

Each buggy subject (attention_subjects.py) changes one method of a tiny correct wrapper that
passes the kit; each test asserts the kind and text of what the kit reports, on which cases,
and that the cases the bug cannot touch pass. The kit builds its own simulated meshes, so
these tests carry no mesh marker. Tolerance: the kit's default (float64, 1e-9; see
ConformanceOptions).
"""

from __future__ import annotations

import pytest

from dtensor_attn import _compat
from dtensor_attn._compat import packed_strided_shard_usable
import torch

import attention_subjects as subjects
from dtensor_attn import AttentionConfig, Layout, LocalMapAttention, make_attention_masks
from dtensor_attn._compat import Shard, strided_shard
from dtensor_attn.backends import REGISTRY
from dtensor_attn.config import Backend
from dtensor_attn.testing.kit.check import DEFAULT_MESHES, assert_conforms, check_attention
from dtensor_attn.testing.kit.result import ConformanceError, FailureKind, Status
from dtensor_attn.testing.kit.subjects import offered_outputs

# Two meshes show both sides of most bugs: tp2 (no CP) and cp2xtp2 (CP and TP).
NARROW = dict(meshes=("tp2", "cp2xtp2"), masks=("causal",), lse=(False,), cache_check=False)
ALL = {("tp2", "mha"), ("tp2", "gqa"), ("cp2xtp2", "mha"), ("cp2xtp2", "gqa")}
CP = {("cp2xtp2", "mha"), ("cp2xtp2", "gqa")}
GQA = {("tp2", "gqa"), ("cp2xtp2", "gqa")}


def _variants():
    """(backend, output layout) of every registry entry, e.g. ``varlen-TNH``."""
    return [pytest.param(b, layout, id=f"{b}-{layout.name}") for b in REGISTRY for layout in offered_outputs(b)]


def _ids(result, status: Status) -> set[str]:
    return {c.id for c in result.with_status(status)}


def _where(result, status: Status) -> set[tuple[str, str]]:
    """(mesh, heads) of the cases with ``status``: NARROW's cases differ in nothing else."""
    return {(c.mesh, c.heads) for c in result.with_status(status)}


def _failures(result, mesh: str, heads: str, kind: FailureKind | None = None):
    (case,) = [c for c in result.cases if (c.mesh, c.heads, c.mask) == (mesh, heads, "causal")]
    return [f for f in case.failures if kind is None or f.kind is kind]


def _kinds(result) -> set[tuple[FailureKind, str]]:
    return {(f.kind, f.what) for f in result.failures}


@pytest.mark.parametrize("mesh_name", DEFAULT_MESHES)
@pytest.mark.parametrize("backend,layout", _variants())
def test_local_map_attention_passes_the_whole_matrix(backend, layout, mesh_name):
    """The kit's default matrix, one mesh per test (GQA, masks and LSE pairwise: every value of
    each with every value of the others); on cp2xtp2 also the cached-state probe."""
    probe = mesh_name == "cp2xtp2"
    result = check_attention(
        factory=lambda config: LocalMapAttention(config.build()), backends=[backend], outputs=[layout],
        meshes=(mesh_name,), cache_check=probe,
    )
    result.raise_for_failures()
    docs = {c.id for c in result.cases if c.mask == "docs"}
    expected_skips = docs if REGISTRY[backend].mask_type is None else set()
    if layout is Layout.TNH and "cp" in mesh_name and not packed_strided_shard_usable():
        # torch 2.11: the packed output's _StridedShard cannot be checked (nor used) there; the
        # probe's first call is on that mesh, so it skips with the same reason
        expected_skips = {c.id for c in result.cases}
        assert all("_StridedShard" in c.reason for c in result.with_status(Status.SKIP))
    else:
        assert all("packed-document" in c.reason for c in result.with_status(Status.SKIP))
    assert _ids(result, Status.SKIP) == expected_skips
    assert len(_ids(result, Status.PASS)) == len(result.cases) - len(expected_skips)
    assert len(result.cases) == 4 + probe


def test_a_torch_limit_on_the_probes_first_call_skips_the_probe_with_its_reason(monkeypatch):
    """torch 2.11 cannot redistribute a packed TNH output's _StridedShard under CP, and
    LocalMapAttention refuses it up front (simulated here on any torch): the matrix skips those
    cases with the reason, and so must the cached-state probe whose first call is on that mesh:
    neither a pass (it tested nothing) nor not_exercised (the subject did nothing wrong)."""
    monkeypatch.setattr(_compat, "packed_strided_shard_usable", lambda: False)
    result = check_attention(
        factory=lambda config: LocalMapAttention(config.build()), backends=[Backend.VARLEN],
        outputs=[Layout.TNH], meshes=("cp2xtp2",), masks=("causal",), lse=(False,), cache_check=True,
    )
    probe = [c for c in result.cases if "cache" in c.id]
    assert [c.status for c in probe] == [Status.SKIP], result.summary()
    assert "_StridedShard" in probe[0].reason
    assert {c.status for c in result.cases} == {Status.SKIP}
    result.raise_for_failures()


@pytest.mark.parametrize("backend,layout", _variants())
def test_the_tiny_wrapper_every_bug_starts_from_passes(backend, layout):
    check_attention(
        factory=subjects.TinyAttention, backends=[backend], outputs=[layout],
        **dict(NARROW, gqa=(True,), lse=(False, True), cache_check=True),
    ).raise_for_failures()


def test_row1_packed_output_with_copied_placements_is_a_shape_failure():
    result = check_attention(factory=subjects.CopiedOutputPlacements, backends=[Backend.VARLEN], outputs=[Layout.TNH], **NARROW)
    assert _where(result, Status.FAIL) == ALL
    assert _kinds(result) == {(FailureKind.SHAPE, "output")}
    (tp2,) = _failures(result, "tp2", "mha")
    assert (tp2.expected, tp2.actual) == ("BLNH (2, 16, 8, 4) or TNH (32, 8, 4)", "(32, 4, 8)")  # head_dim x tp
    assert "placements (S(2))" in tp2.detail


def test_row2_stale_seq_dim_gathers_heads_an_error_with_mha_silent_with_gqa():
    result = check_attention(factory=subjects.StaleSeqDimGather, backends=[Backend.FLEX], **NARROW)
    assert _where(result, Status.FAIL) == CP
    (mha,) = _failures(result, "cp2xtp2", "mha")
    assert mha.kind is FailureKind.ERROR and "q has 4 heads and k/v 8" in mha.detail
    assert {f.kind for f in _failures(result, "cp2xtp2", "gqa")} == {FailureKind.VALUES, FailureKind.GRAD}


def test_row2_stale_seq_dim_labels_the_boundary_wrong():
    result = check_attention(factory=subjects.StaleSeqDimLabel, backends=[Backend.SDPA], **NARROW)
    assert _where(result, Status.FAIL) == CP
    assert _kinds(result) == {(FailureKind.SHAPE, "output")}
    assert all("(S(2), S(2))" in f.detail and f.actual == "(2, 8, 16, 4)" for f in result.failures)


def test_row3_lse_with_q_placements():
    result = check_attention(factory=subjects.LSEWithQPlacements, backends=[Backend.SDPA], **dict(NARROW, lse=(True,)))
    assert _where(result, Status.FAIL) == ALL
    assert all(f.what != "output" for f in result.failures)  # the output is right
    (tp2,) = _failures(result, "tp2", "mha")
    assert (tp2.kind, tp2.what, tp2.actual) == (FailureKind.SHAPE, "lse", "(2, 4, 32)")  # BNL's seq x tp
    (cp,) = _failures(result, "cp2xtp2", "mha", FailureKind.PLACEMENTS)
    assert (cp.what, cp.expected, cp.actual) == ("lse", "(S(2), S(1))", "(S(1), S(2))")


@pytest.mark.parametrize("subject", [subjects.MissingGradPlacements, subjects.PartialGradLabelledReplicate], ids=["row4-missing", "row5-partial-as-replicate"])
def test_rows_4_5_kv_gradients_under_reduced(subject):
    result = check_attention(factory=subject, backends=[Backend.SDPA], **NARROW)
    assert _where(result, Status.FAIL) == CP
    assert _kinds(result) == {(FailureKind.GRAD, "grad k"), (FailureKind.GRAD, "grad v")}


def test_row5_replicated_result_labelled_partial_is_off_by_the_world_size():
    result = check_attention(factory=subjects.ReplicatedLabelledPartial, backends=[Backend.SDPA], **NARROW)
    assert _where(result, Status.FAIL) == ALL
    (tp2,) = _failures(result, "tp2", "mha", FailureKind.VALUES)
    assert "actual = 2 x expected" in tp2.detail
    (cp2xtp2,) = _failures(result, "cp2xtp2", "gqa", FailureKind.VALUES)
    assert "actual = 4 x expected" in cp2xtp2.detail
    with pytest.raises(ConformanceError, match=rf"(?s)case\s+kind\s+what.*{tp2.case}\s+values\s+output \(BLNH\)"):
        result.raise_for_failures()


def test_row6_first_call_cache_is_a_cached_state_failure():
    result = check_attention(factory=subjects.FirstCallCache, backends=[Backend.SDPA], **dict(NARROW, cache_check=True))
    assert _where(result, Status.FAIL) == {("cache-cp2xtp2", "mha")}  # fresh per case: every case passes
    (failure,) = result.failures
    assert failure.kind is FailureKind.CACHED_STATE and failure.what == "call 2 of 5 (cp replicated)"
    assert "expected (R, S(2)), actual (S(1), S(2))" in failure.detail


def test_row7_configured_backend_not_built_ignores_document_masks():
    result = check_attention(
        factory=subjects.configured_flex_built_sdpa, backends=[Backend.FLEX], outputs=[Layout.BLNH],
        **dict(NARROW, masks=("causal", "docs")),
    )
    assert {c.mask for c in result.with_status(Status.FAIL)} == {"docs"}
    assert {c.mask for c in result.with_status(Status.PASS)} == {"causal"}
    # not a bare values failure: the output is the causal-only result, so the mask had no effect
    assert _kinds(result) == {(FailureKind.MASK_NO_EFFECT, "output")}
    assert all("document mask was not applied" in f.detail for f in result.failures)


def test_row8_gqa_flag_not_forwarded_is_an_error_for_gqa():
    result = check_attention(factory=subjects.gqa_flag_dropped, backends=[Backend.VARLEN], outputs=[Layout.BLNH], **NARROW)
    assert _where(result, Status.FAIL) == GQA
    assert all(f.kind is FailureKind.ERROR and "enable_gqa=True" in f.detail for f in result.failures)


def test_row8_heads_expanded_in_the_wrong_order_gives_wrong_values():
    result = check_attention(factory=subjects.TiledHeadExpansion, backends=[Backend.SDPA], **NARROW)
    assert _where(result, Status.FAIL) == GQA
    assert (FailureKind.VALUES, "output (BLNH)") in _kinds(result)


def test_row10_flatten_without_strided_shard_silently_wrong_values():
    result = check_attention(factory=subjects.FlattenWithoutStride, backends=[Backend.VARLEN], outputs=[Layout.TNH], **NARROW)
    assert _where(result, Status.FAIL) == CP
    (placements,) = _failures(result, "cp2xtp2", "mha", FailureKind.PLACEMENTS)
    assert (placements.expected, placements.actual) == ("(_S(0, 2), S(1))", "(S(0), S(1))")
    (values,) = _failures(result, "cp2xtp2", "mha", FailureKind.VALUES)
    assert values.what == "output (TNH)"  # the global shape is right: only values show it


def test_row11_every_rank_is_compared_a_bug_invisible_on_rank_0_is_flagged():
    result = check_attention(factory=subjects.ForgetsCPOffset, backends=[Backend.SDPA], **NARROW)
    assert _where(result, Status.FAIL) == CP
    (values,) = _failures(result, "cp2xtp2", "mha", FailureKind.VALUES)
    assert values.ranks == (0, 1, 2, 3)  # every rank's full tensor
    assert values.shard_ranks == (2, 3)  # the second CP rank's shards; rank 0's own shard is right
    assert "the shards of ranks [0, 1] are right" in values.detail


def test_batch_sharded_meshes_given_as_axis_dicts():
    """dp shards batch: with a local batch of 1, CP's packed tokens are a plain Shard(0)."""
    result = check_attention(
        factory=lambda config: LocalMapAttention(config.build()), backends=[Backend.VARLEN], outputs=[Layout.TNH],
        meshes=({"dp": 2, "cp": 2},), gqa=(True,), masks=("docs",), lse=(True,), cache_check=False,
    )
    result.raise_for_failures()
    (case,) = result.cases
    assert (case.mesh, case.in_placements, case.out_placements) == ("dp2xcp2", "(S(0), S(1))", "(S(0), S(0))")


def test_float32_subjects_with_a_tolerance_for_it():
    """Inputs rounded to float32, the reference computed in float64 from those same values."""
    float32 = dict(meshes=("cp2",), gqa=(True,), masks=("causal",), lse=(True,), cache_check=False, dtype=torch.float32)
    factory = lambda config: LocalMapAttention(config.build())  # noqa: E731
    check_attention(factory=factory, backends=[Backend.SDPA], rtol=1e-5, atol=1e-5, **float32).raise_for_failures()
    strict = check_attention(factory=factory, backends=[Backend.SDPA], **float32)  # float64's 1e-9
    assert {f.kind for f in strict.failures} >= {FailureKind.VALUES} and all(f.max_err < 1e-5 for f in strict.failures)


def test_without_backward_gradient_bugs_go_unseen():
    result = check_attention(factory=subjects.MissingGradPlacements, backends=[Backend.SDPA], **dict(NARROW, backward=False))
    assert result.ok and _where(result, Status.PASS) == ALL


class SplitFactorOne(subjects.TinyAttention):
    """docs/bugs.md row 9, for the kit itself: right values labelled _StridedShard(dim, sf=1), which
    equals Shard(dim); an unnormalised comparison would flag it."""

    def out_placements(self, q):
        return [strided_shard(p.dim, 1) if isinstance(p, Shard) else p for p in super().out_placements(q)]


def test_row9_equivalent_placements_are_not_a_false_alarm():
    result = check_attention(factory=SplitFactorOne, backends=[Backend.SDPA], **NARROW)
    result.raise_for_failures()
    assert {c.out_placements for c in result.cases} == {"(_S(2, 1))", "(_S(1, 1), _S(2, 1))"}


def test_a_users_module_with_its_own_masks_and_a_function_subject():
    config = AttentionConfig(backend=Backend.FLEX, enable_gqa=True)
    module = LocalMapAttention(config.build())
    narrow = dict(meshes=("cp2",), lse=(False,))
    result = check_attention(module, make_mask=lambda positions_BL: make_attention_masks(config, positions_BL), **narrow)
    result.raise_for_failures()
    assert {c.mask for c in result.with_status(Status.PASS)} == {"causal", "docs"}
    assert module._plans == {}  # every case ran on a copy

    def plain_tensor(q, k, v):
        return q.to_local()

    result = check_attention(plain_tensor, **narrow)
    assert {(f.kind, f.expected) for f in result.failures} == {(FailureKind.ERROR, "a DTensor")}
    assert {c.reason for c in result.with_status(Status.SKIP)} == {
        "no make_mask given: pass make_mask=lambda positions_BL: ... to test packed documents",
        "a function cannot be copied: pass an nn.Module or a factory to check cached state",
    }


def test_assert_conforms_raises_the_table_of_failing_cases():
    def raises(q, k, v):
        raise RuntimeError("kernel exploded")

    with pytest.raises(ConformanceError) as failure:
        assert_conforms(raises, meshes=("tp1",), masks=("causal",), gqa=(False,))
    text = str(failure.value)
    assert text.splitlines()[0] == "check_attention(raises): 0 passed, 1 failed, 1 skipped of 2 cases"
    assert "raises-tp1-mha  error  subject" in text and "RuntimeError: kernel exploded" in text


@pytest.mark.parametrize("kwargs,message", [
    (dict(meshes=("tp3",)), "unknown mesh 'tp3'"),
    (dict(meshes=({"ep": 2},)), r"mesh axes \['ep'\] have no meaning here"),
    (dict(masks=("sliding",)), r"masks \['sliding'\] unknown"),
    (dict(gqa=()), r"gqa=\(\) selects no case"),
    (dict(backends=("sdpa",), outputs=(Layout.TNH,)), r"no backend of \['sdpa'\] offers the outputs \['TNH'\]"),
])
def test_bad_options_are_errors_that_say_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_attention(factory=subjects.TinyAttention, **kwargs)
    with pytest.raises(ValueError, match="pass exactly one of subject or factory"):
        check_attention(torch.nn.Identity(), factory=subjects.TinyAttention)
