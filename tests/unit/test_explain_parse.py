"""The parser reads torch's printed placement forms, meshes and shapes; bad input is one line."""

from __future__ import annotations

import pytest

from dtensor_attn._compat import Partial, Replicate, Shard, StridedShard, split_factor, strided_shard
from dtensor_attn.explain import parse_mesh, parse_placement, parse_placements, parse_shape


@pytest.mark.parametrize(
    "text, expected",
    [
        ("S(2)", Shard(2)),
        ("Shard(2)", Shard(2)),
        ("Shard(dim=2)", Shard(2)),
        ("S(-1)", Shard(-1)),
        ("R", Replicate()),
        ("Replicate()", Replicate()),
        ("P", Partial("sum")),
        ("P(sum)", Partial("sum")),
        ("Partial(avg)", Partial("avg")),
        ("Partial(reduce_op='max')", Partial("max")),
        ("_S(1, 8)", strided_shard(1, 8)),
        ("_StridedShard(dim=1, sf=8)", strided_shard(1, 8)),
        ("_StridedShard(dim=1, split_factor=8)", strided_shard(1, 8)),
        ("_StridedShard(1, split_factor=8)", strided_shard(1, 8)),
    ],
)
def test_one_placement(text, expected):
    assert parse_placement(text) == expected


@pytest.mark.parametrize(
    "placement", [Shard(0), Shard(3), Replicate(), Partial("sum"), Partial("avg"), strided_shard(0, 4)]
)
def test_str_and_repr_round_trip(placement):
    """Whatever torch prints, str (short) or repr (long), reads back as the same placement."""
    assert parse_placement(str(placement)) == placement
    assert parse_placement(repr(placement)) == placement


@pytest.mark.parametrize(
    "text",
    ["(S(1), _S(0, 2), R)", "[S(1), _S(0, 2), R]", "S(1), _S(0, 2), R", " ( S(1) , _S( 0 ,2 ) , R ) "],
)
def test_tuples(text):
    assert parse_placements(text) == (Shard(1), strided_shard(0, 2), Replicate())


def test_the_placement_tuple_of_torch_error_messages():
    """Pasting the whole error, old (2.11) or new wording, reads the placements in it."""
    old = (
        "ValueError: use_strided_shard_as_shard_order is True, but placements: "
        "(_StridedShard(dim=1, sf=8),) is unable to be interpreted into a corresponding shard_order"
    )
    new = (
        "_StridedShard placements (_StridedShard(dim=1, sf=8), Shard(dim=0)) cannot be decoded "
        "into a corresponding shard_order"
    )
    (only,) = parse_placements(old)
    assert isinstance(only, StridedShard) and only.dim == 1 and split_factor(only) == 8
    assert parse_placements(new) == (strided_shard(1, 8), Shard(0))


def test_values_pass_through():
    assert parse_placements([Shard(1), "R"]) == (Shard(1), Replicate())
    assert parse_placements(Shard(0)) == (Shard(0),)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8", ((8,), None)),
        ("2,4", ((2, 4), None)),
        ("2x4", ((2, 4), None)),
        ("(2, 4)", ((2, 4), None)),
        ("cp=2,tp=4", ((2, 4), ("cp", "tp"))),
        ((2, 2, 2), ((2, 2, 2), None)),
    ],
)
def test_mesh(text, expected):
    assert parse_mesh(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [("8,256", (8, 256)), ("8x256", (8, 256)), ("[8, 256]", (8, 256)), ("torch.Size([8, 256])", (8, 256)), ("7", (7,))],
)
def test_shape(text, expected):
    assert parse_shape(text) == expected


@pytest.mark.parametrize(
    "parse, text, needle",
    [
        (parse_placements, "Q(1)", "unknown placement 'Q(1)': expected one of"),
        (parse_placements, "S(x)", "expected an integer dim"),
        (parse_placements, "S(1, 2)", "expected Shard(dim)"),
        (parse_placements, "_S(1)", "expected _S(dim, split_factor)"),
        (parse_placements, "_S(1, 0)", "split factor must be >= 1"),
        (parse_placements, "P(mean)", "expected a reduce op"),
        (parse_placements, "(S(1), R", "unbalanced"),
        (parse_placements, "()", "no placements"),
        (parse_mesh, "0", "every axis needs >= 1 rank"),
        (parse_mesh, "cp=2,4", "name all axes"),
        (parse_mesh, "two", "expected an integer mesh size"),
        (parse_shape, "8,-1", "sizes must be >= 0"),
        (parse_shape, "", "empty shape"),
    ],
)
def test_bad_input_is_one_line_value_error(parse, text, needle):
    with pytest.raises(ValueError) as info:
        parse(text)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message
