"""The kit on third-party modules: calling conventions, per-rank masks, third-party flex on
simulated ranks, size-1 axes, axis names, set-up per mesh, and honest verdicts (mask had no
effect; a probe that tested nothing is not a pass).

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

The subjects (kit_subjects.py) are written the way torchtitan writes its inner attentions, on
torch's own local_map and flex_attention. Tolerance: the kit's default (float64, 1e-9).
"""

from __future__ import annotations

import copy
import functools

import pytest
from torch import nn

import attention_subjects as subjects
import kit_subjects
from dtensor_attn import AttentionConfig, LocalMapAttention, make_attention_masks
from dtensor_attn.config import Backend
from dtensor_attn.testing.harness.simulate import build_simulated_mesh
from dtensor_attn.testing.kit import (
    CallingConvention, ConformanceError, FailureKind, MaskScope, Prepared, Shapes, Status, check_attention,
)

FLEX_SHAPES = Shapes(seq=32, head_dim=4)


def flex_convention(**kwargs) -> CallingConvention:
    return CallingConvention(mask_keyword="attention_masks", make_mask=functools.partial(kit_subjects.flex_rank_mask, **kwargs),
                             mask_scope=MaskScope.PER_RANK, mask_for_causal=True, extra_kwargs=lambda case: {"enable_gqa": case.gqa})


def _statuses(result) -> dict[str, Status]:
    return {c.id: c.status for c in result.cases}


@pytest.mark.parametrize("meshes", [("tp1", "tp2"), ("cp2",), ("cp2xtp2",), ({"dp": 2, "cp": 2},)], ids=lambda m: "-".join(map(str, m)))
def test_third_party_flex_runs_per_rank_on_simulated_ranks_and_passes(meshes):
    """torch's flex_attention called by the module itself, with a BlockMask per CP rank: before the
    kit ran it per rank this failed with "no rule registered for HigherOrderOperator flex_attention"."""
    result = check_attention(kit_subjects.ThirdPartyAttention("flex"), convention=flex_convention(), shapes=FLEX_SHAPES,
                             meshes=meshes, combinations="all")
    result.raise_for_failures()
    assert {c.mask for c in result.cases if c.status is Status.PASS} == {"causal", "docs"}
    assert {c.heads for c in result.cases if c.status is Status.PASS} == {"mha", "gqa"}


def test_flex_is_restored_after_the_kit():
    import torch.nn.attention.flex_attention as flex_module

    before = (flex_module.flex_attention_hop, flex_module._validate_device, flex_module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG)
    check_attention(kit_subjects.ThirdPartyAttention("flex"), convention=flex_convention(), shapes=FLEX_SHAPES,
                    meshes=("cp2",), gqa=(False,), masks=("causal",), cache_check=False).raise_for_failures()
    after = (flex_module.flex_attention_hop, flex_module._validate_device, flex_module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG)
    assert after == before


def test_a_per_rank_mask_without_the_rank_offset_is_wrong_on_cp_ranks_above_0():
    result = check_attention(kit_subjects.ThirdPartyAttention("flex"), convention=flex_convention(offset=False),
                             shapes=FLEX_SHAPES, meshes=("tp2", "cp2xtp2"), masks=("causal",), gqa=(False,), cache_check=False)
    assert _statuses(result) == {"ThirdPartyAttention-tp2-mha": Status.PASS, "ThirdPartyAttention-cp2xtp2-mha": Status.FAIL}
    (values,) = result.failures_of(FailureKind.VALUES)
    assert values.shard_ranks == (2, 3)  # the second CP rank's shards; cp rank 0 starts at 0


def test_sdpa_with_is_causal_on_the_local_chunk_is_flagged_on_cp_ranks_above_0():
    """torchtitan's sdpa under full-DTensor CP, reproduced: is_causal=True on the rank's q chunk."""
    convention = CallingConvention(mask_keyword="attention_masks", extra_kwargs=lambda case: {"enable_gqa": case.gqa})
    result = check_attention(kit_subjects.ThirdPartyAttention("sdpa"), convention=convention,
                             meshes=("tp1", "tp2", "cp4"), masks=("causal",), cache_check=False)
    assert {c.mesh for c in result.with_status(Status.FAIL)} == {"cp4"}
    assert {c.mesh for c in result.with_status(Status.PASS)} == {"tp1", "tp2"}
    assert {f.shard_ranks for f in result.failures_of(FailureKind.VALUES)} == {(1, 2, 3)}


def test_gqa_needs_the_modules_keyword_extra_kwargs_passes_it():
    """Without enable_gqa= the GQA cases fail as the issue saw ("size of tensor a (8) must match ... (4)")."""
    bare = CallingConvention(mask_keyword="attention_masks", make_mask=kit_subjects.flex_rank_mask,
                             mask_scope=MaskScope.PER_RANK, mask_for_causal=True)
    kwargs = dict(shapes=FLEX_SHAPES, meshes=("tp2",), masks=("causal",), cache_check=False)
    result = check_attention(kit_subjects.ThirdPartyAttention("flex"), convention=bare, **kwargs)
    assert {c.heads for c in result.with_status(Status.FAIL)} == {"gqa"}
    assert all(f.kind is FailureKind.ERROR for f in result.failures)
    check_attention(kit_subjects.ThirdPartyAttention("flex"), convention=flex_convention(), **kwargs).raise_for_failures()


def test_size_1_axes_get_replicate_inputs_no_false_alarm():
    """The subject refuses a Shard on an axis of size 1, as torchtitan does: the kit places inputs
    as torch normalises them, so tp1 and a dp axis of size 1 pass."""
    convention = CallingConvention(mask_keyword="attention_masks", extra_kwargs=lambda case: {"enable_gqa": case.gqa})
    result = check_attention(kit_subjects.ThirdPartyAttention("sdpa"), convention=convention,
                             meshes=("tp1", {"dp": 1, "tp": 2}), masks=("causal",), cache_check=False)
    result.raise_for_failures()
    assert {c.in_placements for c in result.cases} == {"(R)", "(R, S(2))"}


def test_a_swallowed_mask_is_reported_as_mask_had_no_effect():
    """The default convention passes mask=, which the torchtitan-style module swallows in **kwargs:
    the kit says the mask had no effect (not a bare values failure); with its keyword it passes."""
    kwargs = dict(shapes=FLEX_SHAPES, meshes=("tp2",), gqa=(False,), cache_check=False)
    swallowed = CallingConvention(mask_keyword="mask", make_mask=kit_subjects.flex_rank_mask, mask_scope=MaskScope.PER_RANK)
    causal_only = kit_subjects.ThirdPartyAttention("sdpa")  # attention_masks never set: causal over everything
    result = check_attention(causal_only, convention=swallowed, **kwargs)
    assert _statuses(result) == {"ThirdPartyAttention-tp2-mha": Status.PASS, "ThirdPartyAttention-tp2-mha-docs": Status.FAIL}
    (failure,) = result.failures
    assert (failure.kind, failure.what) == (FailureKind.MASK_NO_EFFECT, "output")
    assert "mask_keyword" in failure.detail and failure.ranks == (0, 1)
    check_attention(kit_subjects.ThirdPartyAttention("flex"), convention=flex_convention(), **kwargs).raise_for_failures()


class IgnoresMask(nn.Module):
    """Takes mask= and drops it: LocalMapAttention without the documents."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = LocalMapAttention(AttentionConfig(backend=Backend.FLEX).build())

    def forward(self, q, k, v, mask=None):
        return self.inner(q, k, v)


def test_a_module_ignoring_its_mask_is_mask_had_no_effect_on_every_mesh():
    config = AttentionConfig(backend=Backend.FLEX)
    result = check_attention(IgnoresMask(), make_mask=lambda positions_BL: make_attention_masks(config, positions_BL),
                             meshes=("tp2", "cp2"), gqa=(False,), cache_check=False)
    assert {c.mesh for c in result.with_status(Status.FAIL)} == {"tp2", "cp2"}
    assert {f.kind for f in result.failures} == {FailureKind.MASK_NO_EFFECT}
    assert all(c.mask == "docs" for c in result.with_status(Status.FAIL))


class AlwaysRaises(nn.Module):
    def forward(self, q, k, v):
        raise RuntimeError("kernel exploded")


def test_a_probe_whose_calls_all_fail_is_not_exercised_never_pass():
    """Before: the probe said pass although every call failed for a fresh subject too."""
    result = check_attention(AlwaysRaises(), meshes=("cp2xtp2",), masks=("causal",), gqa=(False,))
    (probe,) = [c for c in result.cases if c.mesh.startswith("cache-")]
    assert probe.status is Status.NOT_EXERCISED and "the first call failed" in probe.reason
    assert "kernel exploded" in probe.reason and not result.ok
    assert "1 not exercised" in result.summary() and "NOT EXERCISED (tested nothing)" in result.summary()


def test_a_probe_with_only_untestable_later_calls_is_not_exercised():
    """ForgetsCPOffset is right without CP: on tp2 the later calls pass, so the probe exercised
    them; on cp2xtp2 its first call is already wrong for a fresh subject: it tests nothing."""
    factory = lambda config: subjects.ForgetsCPOffset(config)  # noqa: E731
    tp = check_attention(factory=factory, backends=[Backend.SDPA], meshes=("tp2",), masks=("causal",), lse=(False,), gqa=(False,))
    assert tp.ok and tp.case("sdpa-BLNH-cache-tp2").status is Status.PASS
    cp = check_attention(factory=factory, backends=[Backend.SDPA], meshes=("cp2xtp2",), masks=("causal",), lse=(False,), gqa=(False,))
    assert cp.case("sdpa-BLNH-cache-cp2xtp2").status is Status.NOT_EXERCISED
    with pytest.raises(ConformanceError, match="NOT EXERCISED"):
        cp.raise_for_failures()


class MeshBound(nn.Module):
    """Tied to one mesh at set-up (as torchtitan's parallelize ties a module): refuses any other."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = LocalMapAttention(AttentionConfig(backend=Backend.SDPA, enable_gqa=True).build())
        self.mesh = None

    def forward(self, q, k, v):
        if q.device_mesh is not self.mesh:
            raise RuntimeError("not parallelized for this mesh")
        return self.inner(q, k, v)


def test_prepare_sets_a_subject_up_per_mesh_and_may_hand_back_its_own_mesh():
    def prepare(module, context):
        own = build_simulated_mesh({"dp_shard": 1, **context.axes})  # like torchtitan: an extra size-1 axis
        module.mesh = own
        return Prepared(module, own)

    result = check_attention(MeshBound(), prepare=prepare, meshes=("tp2", "cp2xtp2"), masks=("causal",))
    result.raise_for_failures()
    assert {c.in_placements for c in result.cases if c.in_placements} == {"(R, S(2))", "(R, S(1), S(2))"}
    unprepared = check_attention(MeshBound(), meshes=("tp2",), masks=("causal",), cache_check=False)
    assert {f.kind for f in unprepared.failures} == {FailureKind.ERROR}

    def wrong_mesh(module, context):
        return Prepared(module, build_simulated_mesh({"tp": 4}))

    bad = check_attention(MeshBound(), prepare=wrong_mesh, meshes=("tp2",), masks=("causal",), cache_check=False)
    assert all("expected the same axes but for axes of size 1" in f.detail for f in bad.failures)


def test_torchtitan_axis_names_and_user_roles():
    factory = lambda config: LocalMapAttention(config.build())  # noqa: E731
    narrow = dict(backends=[Backend.SDPA], masks=("causal",), lse=(False,), gqa=(True,), cache_check=False)
    result = check_attention(factory=factory, meshes=({"dp_shard": 2, "tp": 2}, {"fsdp": 2, "cp": 2}),
                             axis_roles={"fsdp": "batch"}, **narrow)
    result.raise_for_failures()
    assert [c.in_placements for c in result.cases] == ["(S(0), S(2))", "(S(0), S(1))"]
    with pytest.raises(ValueError, match=r"mesh axes \['fsdp'\] have no meaning here.*axis_roles"):
        check_attention(factory=factory, meshes=({"fsdp": 2},), **narrow)
    with pytest.raises(ValueError, match=r"axis_roles\['ep'\] = 'experts'"):
        check_attention(factory=factory, axis_roles={"ep": "experts"}, **narrow)


def test_configurable_shapes_and_scale_reach_the_subject_and_the_reference():
    scale = 0.3
    config = AttentionConfig(backend=Backend.SDPA, enable_gqa=True, scale=scale)
    shapes = Shapes(batch=1, seq=24, num_q_heads=6, num_kv_heads_gqa=2, head_dim=8, scale=scale)
    result = check_attention(LocalMapAttention(config.build()), shapes=shapes, meshes=("cp2", "tp2"), masks=("causal",))
    result.raise_for_failures()
    wrong = check_attention(LocalMapAttention(config.build()), shapes=dataclasses_replace(shapes, scale=None),
                            meshes=("tp2",), masks=("causal",), cache_check=False)
    assert {f.kind for f in wrong.failures} == {FailureKind.VALUES, FailureKind.GRAD}


def dataclasses_replace(value, **changes):
    import dataclasses

    return dataclasses.replace(value, **changes)


def test_make_mask_and_a_convention_together_are_an_error():
    with pytest.raises(ValueError, match="pass make_mask= or convention="):
        check_attention(IgnoresMask(), make_mask=lambda p: None, convention=CallingConvention())
    with pytest.raises(ValueError, match="convention= is for a subject"):
        check_attention(factory=subjects.TinyAttention, convention=CallingConvention())
    module = copy.deepcopy(IgnoresMask())
    result = check_attention(module, convention=CallingConvention(extra_kwargs=lambda case: {"mask": 1}),
                             meshes=("tp1",), masks=("causal",), gqa=(False,))
    assert "the mask keyword" in result.failures[0].detail
