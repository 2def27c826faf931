"""The kit's option values (kit/options.py, kit/spec.py): every refusal with its message and fix,
the meshes and backends they normalise to, and the tolerance each dtype gets (the derivation
is in options.py: 1e-9 for float64, 5e-2 for bf16/fp16)."""

from __future__ import annotations

import pytest
import torch

from dtensor_attn.config import Backend
from dtensor_attn.layout import Dim
from dtensor_attn.testing.kit import CallingConvention, CaseInfo, ConformanceOptions, Shapes
from dtensor_attn.testing.kit.options import MESHES
from dtensor_attn.testing.kit.spec import parse_axis_roles

REFUSALS = [
    ("combinations", dict(combinations="some"), "combinations='some'; expected 'pairwise' or 'all'"),
    ("unknown-mask", dict(masks=("causal", "sliding", "alibi")),
     "masks ['alibi', 'sliding'] unknown; expected a subset of ('causal', 'docs')"),
    ("no-gqa-value", dict(gqa=()), "gqa=() selects no case. Fix: keep at least one value."),
    ("no-lse-value", dict(lse=[]), "lse=() selects no case"),
    ("no-mask", dict(masks=()), "masks=() selects no case"),
    ("no-output", dict(outputs=()), "outputs=() selects no case"),
    ("unknown-mesh-id", dict(meshes=("tp3",)), "unknown mesh 'tp3'; expected one of ['cp2', "),
    ("axis-without-a-role", dict(meshes=({"ep": 2, "tp": 2},)),
     "mesh axes ['ep'] have no meaning here; expected axes named ['cp', 'dp', 'dp_replicate', "
     "'dp_shard', 'tp'], or axis_roles={'ep': 'batch' | 'seq' | 'heads' | 'replicate'}"),
    ("axis-size-zero", dict(meshes=({"tp": 0},)), "mesh axis tp=0: expected a positive int size"),
    ("no-axes", dict(meshes=({},)), "a mesh needs at least one axis"),
    ("unknown-backend", dict(backends=("flash",)), "'flash' is not a valid Backend"),
    ("shapes-as-dict", dict(shapes={"seq": 32}), "shapes={'seq': 32}; expected a Shapes(...). Fix: shapes=Shapes(seq=256)"),
    ("bad-role", dict(axis_roles={"ep": "experts"}), "axis_roles['ep'] = 'experts'; expected one of "
     "['batch', 'heads', 'replicate', 'seq']"),
]


@pytest.mark.parametrize("kwargs,message", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_options_refuse_what_selects_nothing_or_means_nothing(kwargs, message):
    with pytest.raises(ValueError) as error:
        ConformanceOptions(**kwargs)
    assert message in str(error.value)


def test_meshes_are_ids_with_their_axes_and_roles_extend_the_defaults():
    options = ConformanceOptions(meshes=("cp2xtp4", {"ep": 2, "cp": 2}), axis_roles={"ep": "replicate"},
                                 backends=("varlen", Backend.FLEX), gqa=[True])
    assert options.meshes == (("cp2xtp4", {"cp": 2, "tp": 4}), ("ep2xcp2", {"ep": 2, "cp": 2}))
    assert options.backends == (Backend.VARLEN, Backend.FLEX) and options.gqa == (True,)
    assert options.axis_dims(("ep", "cp", "dp_shard", "tp")) == (None, Dim.L, Dim.B, Dim.N)
    assert dict(MESHES["dp2xcp2xtp2"]) == {"dp": 2, "cp": 2, "tp": 2}


@pytest.mark.parametrize("dtype,rtol,atol,expected", [
    (None, None, None, (torch.float64, 1e-9, 1e-9)),
    (torch.float64, None, None, (torch.float64, 1e-9, 1e-9)),
    (torch.float32, None, None, (torch.float32, 1e-9, 1e-9)),  # not half: float64's margin
    (torch.bfloat16, None, None, (torch.bfloat16, 5e-2, 5e-2)),
    (torch.float16, None, None, (torch.float16, 5e-2, 5e-2)),
    (torch.bfloat16, 1e-3, None, (torch.bfloat16, 1e-3, 5e-2)),  # each given one stays
    (None, None, 0.0, (torch.float64, 1e-9, 0.0)),  # 0 is a value, not "unset"
], ids=["default", "float64", "float32", "bf16", "fp16", "bf16-own-rtol", "zero-atol"])
def test_the_tolerance_follows_the_dtype_unless_given(dtype, rtol, atol, expected):
    options = ConformanceOptions(dtype=dtype, rtol=rtol, atol=atol)
    assert (options.dtype, options.rtol, options.atol) == expected
    settings = options.settings()
    assert (settings.dtype, settings.rtol, settings.atol, settings.device) == (*expected, torch.device("cpu"))


@pytest.mark.parametrize("field,value", [
    ("batch", True), ("seq", 16.0), ("head_dim", -1), ("num_q_heads", "8"), ("num_kv_heads_gqa", 0),
], ids=["bool", "float", "negative", "string", "zero"])
def test_shapes_take_positive_ints_only(field, value):
    with pytest.raises(ValueError, match=rf"^check_attention: Shapes\.{field}={value!r}; expected a positive int$"):
        Shapes(**{field: value})


@pytest.mark.parametrize("shapes,sizes,scale", [
    (Shapes(), {Dim.B: 2, Dim.L: 16, Dim.N: 8, Dim.H: 4}, 0.5),
    (Shapes(batch=3, seq=12, num_q_heads=6, num_kv_heads_gqa=2, head_dim=9), {Dim.B: 3, Dim.L: 12, Dim.N: 6, Dim.H: 9}, 1 / 3),
    (Shapes(scale=0.125), {Dim.B: 2, Dim.L: 16, Dim.N: 8, Dim.H: 4}, 0.125),
], ids=["default", "custom", "own-scale"])
def test_shapes_give_sizes_by_dim_and_the_softmax_scale(shapes, sizes, scale):
    assert shapes.sizes() == sizes
    assert shapes.softmax_scale() == pytest.approx(scale, rel=1e-15)


def test_a_case_has_its_kv_heads_and_a_convention_never_lets_extra_kwargs_set_the_mask():
    mha = CaseInfo(gqa=False, documents=True, lse=True, shapes=Shapes(num_q_heads=6, num_kv_heads_gqa=3))
    assert mha.num_kv_heads == 6 and CaseInfo(gqa=True, documents=False, lse=None, shapes=mha.shapes).num_kv_heads == 3
    convention = CallingConvention(mask_keyword="attention_masks",
                                   extra_kwargs=lambda case: {"attention_masks": None, "scale": 1.0})
    with pytest.raises(ValueError, match="extra_kwargs returned 'attention_masks', the mask keyword; .*Fix: build it in make_mask"):
        convention.kwargs(mha)
    with pytest.raises(ValueError, match="'everywhere' is not a valid MaskScope"):
        CallingConvention(mask_scope="everywhere")


@pytest.mark.parametrize("roles,expected", [
    ({"ep": None, "sp": "seq"}, {"ep": None, "sp": Dim.L}),
    ({"fsdp": Dim.B, "tp": "heads"}, {"fsdp": Dim.B, "tp": Dim.N}),
], ids=["none-and-word", "dim-and-word"])
def test_axis_roles_take_words_dims_or_none(roles, expected):
    assert parse_axis_roles(roles) == expected


@pytest.mark.parametrize("role", [Dim.H, "head_dim", 2], ids=["head-dim", "word", "int"])
def test_axis_roles_refuse_what_no_axis_shards(role):
    with pytest.raises(ValueError, match=r"axis_roles\['x'\] = .*Fix: e.g. axis_roles=\{'x': 'batch'\}"):
        parse_axis_roles({"x": role})
