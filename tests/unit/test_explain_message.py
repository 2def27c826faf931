"""Reading pasted messages, the symbolic meaning and the ranked causes, as pure functions.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).
"""

from __future__ import annotations

import random

import pytest

from dtensor_attn import _compat
from dtensor_attn._compat import Partial, Replicate, Shard, strided_shard
from dtensor_attn.explain.causes import CauseKind, Focus, rank_causes
from dtensor_attn.explain.message import MAX_CHARS, MessageKind, read_message
from dtensor_attn.explain.printed import find_global_shape, find_mesh, find_spec, placements_of_spec
from dtensor_attn.explain.symbolic import Size, Sizes, decode_verdicts, meaning

SEED_211 = (
    "ValueError: use_strided_shard_as_shard_order is True, but placements: "
    "(_StridedShard(dim=1, sf=8),) is unable to be interpreted into a corresponding shard_order"
)
VIEW_211 = (
    "RuntimeError: ('Attempted to flatten multiple dimensions, with dimension 2 being sharded. ', "
    "'It cannot be performed without redistribution, which is disallowed by the current operator.')"
    "\n\nSharding propagation failed for aten.view.default(Spec(f32[8, 2, 12](S(2))), [2, 4, -1]) "
    "on DeviceMesh((tp=4), 'cuda', stride=(1,)))"
)


@pytest.mark.parametrize(
    "text, kind, dim",
    [
        (SEED_211, MessageKind.NOT_INTERPRETED, None),
        ("_StridedShard placements (_StridedShard(dim=1, sf=8),) cannot be decoded into a corresponding shard_order", MessageKind.NOT_DECODED, None),
        (VIEW_211, MessageKind.FLATTEN_SHARDED, 2),
        ("RuntimeError: Attempted to flatten multiple dimensions, with dimension 1 being sharded.", MessageKind.FLATTEN_SHARDED, 1),
        ("Cannot flatten unevenly sharded tensor: dimension 1 (size 6) is not evenly divisible by mesh dimension 0 (size 4).", MessageKind.FLATTEN_UNEVEN, 1),
        ("Attempted to flatten unevenly sharded dimension 0, which would require resharding the input.", MessageKind.FLATTEN_UNEVEN, 0),
        ("Cannot unflatten unevenly sharded tensor: output dimension 0 (size 3) is not evenly divisible by mesh dimension 0 (size 2).", MessageKind.UNFLATTEN_UNEVEN, 0),
        ("('Attempted to split the sharded dimension 0 into multiple subdimensions. ', 'It cannot ...')", MessageKind.UNFLATTEN_UNEVEN, 0),
        ("This operation would remove or reshape sharded dimension 1, which requires redistribution.", MessageKind.RESHAPE_SHARDED, 1),
        ("Sharding propagation failed for aten.view.default(Spec(f32[8, 6](S(1))), [48]) on DeviceMesh((tp=2), 'cpu', stride=(1,)))", MessageKind.PROPAGATION_FAILED, None),
        ("Sharding propagation failed on op aten.view.default(Spec(f32[8, 6](S(1))), [48]) on DeviceMesh((tp=2), 'cpu', stride=(1,))).\nError: boom", MessageKind.PROPAGATION_FAILED, None),
        ("(_S(0, 4), S(1))", MessageKind.PLACEMENTS, None),
    ],
)
def test_each_torch_message_is_read_as_its_kind(text, kind, dim):
    message = read_message(text)
    assert (message.kind, message.dim) == (kind, dim)


def test_a_whole_view_failure_gives_spec_view_mesh_and_the_users_frame():
    traceback = (
        'Traceback (most recent call last):\n  File "/home/me/model.py", line 42, in forward\n'
        "    out = self.attn(q, k, v).view(bs, seqlen, -1)\n"
        '  File "/venv/site-packages/torch/distributed/tensor/_dispatch.py", line 290, in slow_path\n'
        "    raise RuntimeError(\n" + VIEW_211
    )
    message = read_message(traceback)
    assert message.placements == (Shard(2),) and message.global_shape == (8, 2, 12)
    assert message.view_shape == (2, 4, 24)  # the -1 resolved from the numel
    assert (message.mesh_shape, message.mesh_names) == ((4,), ("tp",))
    assert message.op == "aten.view.default" and message.error_type == "RuntimeError"
    assert str(message.frame) == "model.py:42 in forward: out = self.attn(q, k, v).view(bs, seqlen, -1)"
    assert message.line.startswith("RuntimeError: ('Attempted to flatten") and "Sharding" not in message.line


def test_torchrun_rank_prefixes_are_ignored():
    """torchrun prints "[rank3]: " before each line, and "[rank3]:" alone for a blank one."""
    prefixed = "\n".join(f"[rank3]: {line}" if line else "[rank3]:" for line in VIEW_211.splitlines())
    assert read_message(prefixed) == read_message(VIEW_211)
    assert "Sharding propagation" not in read_message(prefixed).line


def test_an_uneven_message_of_a_one_axis_spec_gives_the_mesh():
    message = read_message(
        "Cannot flatten unevenly sharded tensor: dimension 1 (size 6) is not evenly divisible by "
        "mesh dimension 0 (size 4). Sharding propagation failed for aten.view.default(Spec(f32[2, 6, 3](S(1))), [2, 18])"
    )
    assert (message.dim_size, message.axis, message.axis_size, message.mesh_shape) == (6, 0, 4, (4,))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Spec(f32[8, 2, 12](S(2)))", ((Shard(2),), (8, 2, 12))),
        ("Spec(bf16[32, 4, 3](_S(0, 4)S(1)))", ((strided_shard(0, 4), Shard(1)), (32, 4, 3))),
        ("Spec(f32[4, 4](S(1)[1]S(1)[0]R))", ((Shard(1), Shard(1), Replicate()), (4, 4))),
        ("Spec(f32[4](P(sum)R))", ((Partial("sum"), Replicate()), (4,))),
        ("Spec(S(2) on (8, 2, 12))", ((Shard(2),), (8, 2, 12))),
        ("Spec((S(1), R) on (8, 2))", ((Shard(1), Replicate()), (8, 2))),
    ],
)
def test_specs_as_torch_prints_them(text, expected):
    spec = find_spec(f"aten.view.default({text}, [2])")
    assert (spec.placements, spec.shape) == expected


@pytest.mark.parametrize(
    "text, shape, names",
    [
        ("DeviceMesh((cp=2, tp=4), 'cuda', stride=(4, 1))", (2, 4), ("cp", "tp")),
        ("DeviceMesh((8,), 'cpu', stride=(1,))", (8,), None),
        ("DeviceMesh('cuda', [[0, 1], [2, 3]], mesh_dim_names=('cp', 'tp'))", (2, 2), ("cp", "tp")),
        ("DeviceMesh('cpu', [0, 1, ...], mesh_dim_names=('cp','tp'))", None, ("cp", "tp")),
        ("DeviceMesh('cpu', [0, 1, 2, 3])", (4,), None),
        ("the mesh shape (2, 4) of the run", (2, 4), None),
    ],
)
def test_meshes_as_torch_prints_them(text, shape, names):
    mesh = find_mesh(text)
    assert (mesh.shape, mesh.names) == (shape, names)


def test_global_shapes_and_concatenated_placements():
    assert find_global_shape("got torch.Size([8, 256]) here") == (8, 256)
    assert find_global_shape("global shape: (8, 2, 12)") == (8, 2, 12)
    assert find_global_shape("no sizes here") is None
    assert placements_of_spec("_S(0, 4)S(1)") == (strided_shard(0, 4), Shard(1))


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "nothing to explain"),
        ("ValueError:", "cannot read 'ValueError:'"),
        ("hello", "expected placements as torch prints them"),
        ("(_S(1, 8)", "unbalanced '('"),
        ("_S(1, x)", "expected an integer split factor, got 'x'"),
        ("_S(1, 99999999999999999999)", "out of range"),
        ("S(1)" * (MAX_CHARS // 4 + 1), f"expected at most {MAX_CHARS}"),
    ],
)
def test_unreadable_text_is_a_one_line_error_with_the_accepted_forms(text, needle):
    with pytest.raises(ValueError) as info:
        read_message(text)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_a_known_message_whose_placements_do_not_read_still_explains():
    message = read_message("use_strided_shard_as_shard_order is True, but placements: (_StridedShard(dim=1, sf=8 is unable")
    assert message.kind is MessageKind.NOT_INTERPRETED and message.placements is None
    assert "unbalanced" in message.placements_error


def test_sizes_print_as_symbols_and_numbers():
    s, n = Size(symbols=("S",)), Size(symbols=("N",))
    assert str(s.over(Size(8)).over(n)) == "S/(8*N)"
    assert str(Size(256).over(Size(8))) == "32"
    assert str(Size(256).over(Size(8)).over(n)) == "32/N"
    assert Size(6).over(Size(4)).uneven and not Size(8).over(Size(4)).uneven


def test_the_seed_placement_means_blocks_split_across_the_axis():
    (line,) = meaning((strided_shard(1, 8),), Sizes(1, sharded_dims=(1,)))
    assert line == (
        "_S(1, 8) on axis 0: dim 1 of size S is cut into 8 blocks of S/8; each block is split "
        "across the N ranks of the mesh axis: rank r holds the r-th piece (S/(8*N)) of every "
        "block, S/N in all"
    )


def test_meaning_uses_what_is_known_and_names_axes():
    lines = meaning((Shard(0), strided_shard(0, 2)), Sizes(2, (2, 2), ("dp", "cp"), (24, 3), (0,)))
    assert lines[0] == "S(0) on axis 0: dim 0 of size 24 is cut into 2 contiguous blocks of 12; rank r of the axis holds block r"
    assert "dim 0 (the 12 each rank holds after axis 0) is cut into 2 blocks of 6" in lines[1]
    assert "split across the 2 ranks of mesh axis 1 (cp): rank r holds the r-th piece (3)" in lines[1]
    uneven = meaning((Shard(1),), Sizes(1, (4,), None, (2, 6, 3), (1,)))
    assert "4 contiguous blocks of up to 2 (torch.chunk: 2, 2, 2, 0)" in uneven[0]


def _random_placements(rng: random.Random, num_axes: int):
    choices = []
    for _ in range(num_axes):
        dim, kind = rng.randrange(2), rng.random()
        choices.append(Replicate() if kind < 0.2 else Shard(dim) if kind < 0.5 else strided_shard(dim, rng.choice([2, 3, 4, 6])))
    return tuple(choices)


def test_never_decodes_holds_for_every_mesh_torch_is_given():
    """Where the explainer says 'never decodes, for any mesh', torch's decoder agrees on many
    meshes; where it says 'decodes only if ...', some mesh meeting the condition decodes."""
    rng = random.Random(0)
    num_never = num_conditional = 0
    for _ in range(300):
        placements = _random_placements(rng, rng.randint(1, 3))
        for verdict in decode_verdicts(placements, Sizes(len(placements))):
            if verdict.decodes is False:
                num_never += 1
                for _ in range(10):
                    mesh = tuple(rng.choice([1, 2, 3, 4, 6]) for _ in placements)
                    assert _compat.torch_shard_order(placements, mesh) is None, (placements, mesh)
            elif verdict.decodes is None and "decode too" not in verdict.reason:
                num_conditional += 1  # later plain shards only: the first one's size = sf decodes
                sf = _compat.split_factor(verdict.placement)
                later = [b for b in range(verdict.axis + 1, len(placements)) if getattr(placements[b], "dim", None) == verdict.placement.dim]
                mesh = tuple(sf if b == later[0] else 1 for b in range(len(placements)))
                others = decode_verdicts(placements, Sizes(len(placements), mesh))
                assert [v.decodes for v in others if v.axis == verdict.axis] == [True], (placements, mesh)
    assert num_never > 20 and num_conditional > 5


def test_the_mislabel_ranks_first_for_a_strided_inner_dim_and_cp_packing_for_dim_0():
    def first(kind, **focus):
        return rank_causes(kind, Focus(**focus))[0].kind

    assert first(MessageKind.NOT_INTERPRETED, dim=1, split_factor=8) is CauseKind.PACKED_TNH_MISLABEL
    assert first(MessageKind.NOT_DECODED, dim=0, split_factor=4) is CauseKind.CP_PACKED_TOKENS
    assert first(MessageKind.PLACEMENTS, dim=0, split_factor=3, later_axes=(1,)) is CauseKind.RIGHT_TO_LEFT_MISMATCH
    assert first(MessageKind.FLATTEN_SHARDED, dim=2) is CauseKind.PACKED_TNH_MISLABEL
    assert first(MessageKind.FLATTEN_SHARDED, dim=1) is CauseKind.CP_PACKED_TOKENS
    assert first(MessageKind.FLATTEN_SHARDED, dim=1, merged=(0, 1), ndim=2) is CauseKind.FLATTENED_SHARDED_INNER_DIM
    assert first(MessageKind.FLATTEN_UNEVEN, dim=1) is CauseKind.UNEVEN_SIZE
    assert first(MessageKind.UNFLATTEN_UNEVEN, dim=1) is CauseKind.SPLIT_OF_SHARDED_DIM
    assert first(MessageKind.RESHAPE_SHARDED, dim=1) is CauseKind.REMOVED_SHARDED_DIM
    assert first(MessageKind.PROPAGATION_FAILED, local_view=True) is CauseKind.NON_CONTIGUOUS_LOCAL
    assert rank_causes(MessageKind.PLACEMENTS, Focus()) == []  # everything decodes: nothing to fix


def test_every_cause_has_a_fix():
    focus = Focus(dim=1, split_factor=8, strided_text="_S(1, 8)", later_axes=(1,), view="(8, 6) -> (48,)", sizes="dim 1 ...")
    for kind in MessageKind:
        for cause in rank_causes(kind, focus):
            assert cause.fix and cause.why and cause.kind.value, (kind, cause)


def test_the_local_map_kernel_is_named_from_the_traceback_or_the_trace():
    traceback = (
        'Traceback (most recent call last):\n  File "/home/me/model.py", line 42, in forward\n'
        "    out = self.attn(q, k, v)\n"
        '  File "/venv/site-packages/torch/distributed/tensor/experimental/_func_map.py", line 250, in _local_map_wrapped\n'
        "    out = func(*local_args, **kwargs)\n"
        '  File "/home/me/kernels.py", line 7, in packed_attention\n'
        "    return out.view(-1, n, h)\n" + SEED_211
    )
    message = read_message(traceback)
    assert message.local_map == "packed_attention"
    assert str(message.frame) == "kernels.py:7 in packed_attention: return out.view(-1, n, h)"
    assert read_message("#1 local_map(packed_attention) in attn: " + SEED_211).local_map == "packed_attention"
    assert read_message(SEED_211).local_map is None
