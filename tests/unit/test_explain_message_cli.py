"""``python -m dtensor_attn explain`` answers with only what the user has: the error message.

One golden answer per message kind, the whole CLI output pinned in ``golden/explain_*.txt``
(``EXPECTTEST_ACCEPT=1 pytest tests/unit/test_explain_message_cli.py`` rewrites them after an
intended change). The messages are torch's own: the torch 2.13 ones as simulated ranks make them
(``test_the_pinned_torch_213_messages_are_what_torch_prints`` checks that), the torch 2.11 ones
from its source and the H100 runs (docs/gpu-results.md).
"""

from __future__ import annotations

import contextlib
import io
import shlex

import pytest
import torch
from torch.distributed.tensor import Shard, distribute_tensor

from dtensor_attn import _compat
from dtensor_attn.__main__ import main
from dtensor_attn._compat import strided_shard
from dtensor_attn.explain.message import MessageKind, read_message
from dtensor_attn.testing.golden import assert_golden
from dtensor_attn.testing.harness.simulate import simulated_mesh

NOT_INTERPRETED = (  # torch 2.11, full_tensor() of the seed bug's output
    "ValueError: use_strided_shard_as_shard_order is True, but placements: "
    "(_StridedShard(dim=1, sf=8),) is unable to be interpreted into a corresponding shard_order"
)
NOT_DECODED = (  # torch 2.13, _dtensor_spec._normalize_placements_into_shard_order
    "torch.distributed.tensor._dtensor_spec._StridedShardNotDecodableError: _StridedShard "
    f"placements {(strided_shard(0, 4), Shard(1))!r} cannot be decoded into a corresponding shard_order"
)
FLATTEN_DIM_2 = """\
[rank0]: Traceback (most recent call last):
[rank0]:   File "/home/me/train.py", line 88, in <module>
[rank0]:     loss = model(tokens).sum()
[rank0]:   File "/home/me/model.py", line 42, in forward
[rank0]:     out = self.attn(q, k, v).view(bs, seqlen, -1)
[rank0]:   File "/opt/venv/lib/python3.11/site-packages/torch/distributed/tensor/_dispatch.py", line 290, in _propagate_op_sharding_dispatch_slow_path
[rank0]:     raise RuntimeError(
[rank0]: RuntimeError: ('Attempted to flatten multiple dimensions, with dimension 2 being sharded. ', 'It cannot be performed without redistribution, which is disallowed by the current operator.')
[rank0]:
[rank0]: Sharding propagation failed for aten.view.default(Spec(f32[8, 2, 12](S(2))), [2, 4, -1]) on DeviceMesh((tp=4), 'cuda', stride=(1,)))
"""
FLATTEN_DIM_1 = (  # torch 2.11: packing a CP-sharded BLNH tensor into tokens
    "RuntimeError: ('Attempted to flatten multiple dimensions, with dimension 1 being sharded. ', "
    "'It cannot be performed without redistribution, which is disallowed by the current operator.')"
    "\n\nSharding propagation failed for aten.view.default(Spec(bf16[2, 8, 4, 3](S(1))), [16, 4, 3]) "
    "on DeviceMesh((cp=2), 'cuda', stride=(1,)))"
)
FLATTEN_UNEVEN = (
    "RuntimeError: Cannot flatten unevenly sharded tensor: dimension 1 (size 6) is not evenly "
    "divisible by mesh dimension 0 (size 4). Please redistribute the tensor before this operation."
    "\n\nSharding propagation failed for aten.view.default(Spec(f32[2, 6, 3](S(1))), [2, 18]) on "
    "DeviceMesh((tp=4), 'cpu', stride=(1,)))"
)
UNFLATTEN_UNEVEN = (
    "RuntimeError: Cannot unflatten unevenly sharded tensor: output dimension 0 (size 3) is not "
    "evenly divisible by mesh dimension 0 (size 2). Please redistribute the tensor before this "
    "operation.\n\nSharding propagation failed for aten.view.default(Spec(f32[8, 6](S(1))), "
    "[8, 3, 2]) on DeviceMesh((tp=2), 'cpu', stride=(1,)))"
)
RESHAPE_SHARDED = (
    "RuntimeError: This operation would remove or reshape sharded dimension 1, which requires "
    "redistribution. Please redistribute the input first.\n\nSharding propagation failed for "
    "aten.view.default(Spec(f32[8, 1](S(1))), [8]) on DeviceMesh((tp=2), 'cpu', stride=(1,)))"
)
PROPAGATION_FAILED = (  # the last line alone, as log scrapers keep it
    "Sharding propagation failed for aten.view.default(Spec(f32[8, 2, 12](S(2))), [2, 4, 24]) on "
    "DeviceMesh((tp=4), 'cuda', stride=(1,)))"
)
ANSWERS = {  # golden name -> (argv after "explain", stdin), one per message kind
    "explain_not_interpreted": ((NOT_INTERPRETED,), None),
    "explain_not_decoded": ((NOT_DECODED,), None),
    "explain_flatten_sharded_dim2_traceback": (("-",), FLATTEN_DIM_2),
    "explain_flatten_sharded_dim1": ((FLATTEN_DIM_1,), None),
    "explain_flatten_uneven": ((FLATTEN_UNEVEN,), None),
    "explain_unflatten_uneven": ((UNFLATTEN_UNEVEN,), None),
    "explain_reshape_sharded": ((RESHAPE_SHARDED,), None),
    "explain_propagation_failed": ((PROPAGATION_FAILED,), None),
    "explain_placements_only": (("_S(1, 8)",), None),
    "explain_message_with_options": ((NOT_INTERPRETED, "--mesh", "8", "--shape", "8,256"), None),
}


def explain(*argv: str, stdin: str | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        if stdin is not None:
            stack.enter_context(pytest.MonkeyPatch.context()).setattr("sys.stdin", io.StringIO(stdin))
        code = main(["explain", *argv])
    return code, out.getvalue(), err.getvalue()


# Answers that print what this torch's view rule does with the message's view. torch 2.13's rule
# folds a sharded inner dim into a _StridedShard and refuses to drop a sharded size-1 dim; torch
# 2.11's refuses the first and drops into Replicate(). Their goldens have a second file,
# "<name>__view_refuses_flatten", picked by behaviour (one probe: the two supported torches
# differ in both; a torch that differs in one only shows a golden diff, never a silent pass).
VIEW_RULE_ANSWERS = {"explain_flatten_sharded_dim1", "explain_flatten_sharded_dim2_traceback",
                     "explain_reshape_sharded", "explain_propagation_failed"}


def golden_name(name: str) -> str:
    if name in VIEW_RULE_ANSWERS and not _compat.view_flattens_sharded_dims():
        return f"{name}__view_refuses_flatten"
    return name


@pytest.mark.parametrize("name", ANSWERS)
def test_each_message_kind_gets_its_pinned_answer(name):
    argv, stdin = ANSWERS[name]
    code, out, err = explain(*argv, stdin=stdin)
    assert (code, err) == (0, "")
    assert_golden(out, golden_name(name))


def test_the_task_message_needs_no_options():
    """Issue 18: the 2.11 message alone used to fail with 'the following arguments are required:
    --mesh, --shape'; it now says what _S(1, 8) means, why it never decodes, and the first cause."""
    code, out, err = explain(NOT_INTERPRETED)
    assert (code, err) == (0, "")
    assert (
        "dim 1 of size S is cut into 8 blocks of S/8; each block is split across the N ranks of the "
        "mesh axis: rank r holds the r-th piece (S/(8*N)) of every block, S/N in all"
    ) in out
    assert "never decodes, for any mesh" in out and "(a 1-axis mesh has none)" in out
    causes = out.split("likely causes, most likely first:\n")[1]
    assert causes.startswith("  1. packed-TNH mislabel (torchtitan PR #2761)")
    assert "infer_out_placements(in_placements, Layout.BLNH, Layout.TNH, ...)" in causes.split("  2. ")[0]
    assert "add --mesh and --shape" in out


def test_a_message_that_names_mesh_and_shape_prints_the_rank_table():
    code, out, _ = explain("-", stdin=FLATTEN_DIM_2)
    assert code == 0
    assert "rank table: placements (S(2)) on mesh (tp=4), global shape (8, 2, 12)" in out
    assert "  3     (3,)   (8, 2, 3)  all        all        9-11" in out
    assert "in your code: model.py:42 in forward: out = self.attn(q, k, v).view(bs, seqlen, -1)" in out
    assert "add --mesh" not in out  # nothing is missing


def test_the_suggested_command_line_runs_and_prints_a_rank_table():
    """The 'e.g.' line is built from what was parsed; copied as is, it must work."""
    for text in (NOT_INTERPRETED, NOT_DECODED, "_S(1, 8)", "(S(0), _S(0, 2))"):
        _, out, _ = explain(text)
        (example,) = [line for line in out.splitlines() if line.strip().startswith("e.g. python -m")]
        argv = shlex.split(example.strip()[len("e.g. python -m dtensor_attn "):])
        code, table, err = explain(*argv[1:])
        assert (code, err) == (0, ""), example
        assert table.splitlines()[2].startswith("rank  coord"), table


def test_options_fill_in_what_the_message_lacks():
    code, out, _ = explain(NOT_DECODED, "--mesh", "cp=2,tp=2")
    assert code == 0
    assert "mesh (cp=2, tp=2) from --mesh" in out
    assert "each block is split across the 2 ranks of mesh axis 0 (cp)" in out
    assert "add --shape:" in out and "add --mesh" not in out


def test_a_message_mesh_that_does_not_fit_the_placements_is_noted_not_used():
    text = NOT_INTERPRETED + " on DeviceMesh((dp=2, tp=4), 'cuda', stride=(4, 1))"
    code, out, _ = explain(text)
    assert code == 0
    assert "note: the message's mesh (2, 4) has 2 axes for 1 placements: not used" in out
    assert "rank table:" not in out and '--mesh N --shape S0,S1' in out


VIEWS = {  # name -> (tp size, global shape, placements, view target): a view torch 2.13 refuses
    "uneven": (4, (2, 6, 3), [Shard(1)], (2, 18)),
    "unflatten": (2, (8, 6), [Shard(1)], (8, 3, 2)),
    "reshape": (2, (8, 1), [Shard(1)], (8,)),
}


def _real_message(make: str) -> str:
    """torch's message, ``Type: text`` as a traceback's last line shows it. Skips where this
    torch answers the view (torch 2.11 drops a sharded size-1 dim into Replicate())."""
    tp, shape, placements, target = VIEWS[make]
    with simulated_mesh({"tp": tp}) as mesh:
        x = distribute_tensor(torch.randn(shape), mesh, placements)
        try:
            answered = x.view(target).placements
        except RuntimeError as error:
            return f"{type(error).__name__}: {error}"
    pytest.skip(f"this torch's DTensor answers the view {shape} {placements} -> {target} with {answered}: "
                "no message to read")


@pytest.mark.parametrize(
    "make, pinned, kind",
    [
        ("uneven", FLATTEN_UNEVEN, MessageKind.FLATTEN_UNEVEN),
        ("unflatten", UNFLATTEN_UNEVEN, MessageKind.UNFLATTEN_UNEVEN),
        ("reshape", RESHAPE_SHARDED, MessageKind.RESHAPE_SHARDED),
    ],
)
def test_the_pinned_torch_213_messages_are_what_torch_prints(make, pinned, kind):
    """Made by real DTensor views on simulated ranks. On torch 2.13 the text is the pinned one
    word for word; on any torch the explainer reads the kind, the spec, the view and the mesh."""
    real = _real_message(make)
    message = read_message(real)
    assert message.kind is kind
    assert message.placements is not None and message.view_shape is not None and message.mesh_shape is not None
    if _compat.view_flattens_sharded_dims():  # torch 2.13's view algebra: its wording too
        assert real == pinned
    code, out, err = explain(real)
    assert (code, err) == (0, "") and "likely causes, most likely first:" in out


def test_the_readme_example_is_what_the_tool_prints():
    """README's "Debugging _StridedShard errors" shows the answer to the task's message: pinned."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    command = f'$ python -m dtensor_attn explain "{NOT_INTERPRETED}"\n'
    assert command in readme
    shown = readme.split(command, 1)[1].split("\n```", 1)[0] + "\n"
    assert shown == explain(NOT_INTERPRETED)[1]


def test_axis_names_and_a_shape_named_in_the_text_are_used():
    """A mesh printed with its ranks elided still names its axes; torch.Size gives the shape."""
    text = (
        "ValueError: use_strided_shard_as_shard_order is True, but placements: "
        "(_StridedShard(dim=0, sf=4), Shard(dim=1)) is unable to be interpreted into a corresponding shard_order\n"
        "mesh: DeviceMesh('cpu', [0, 1, ...], mesh_dim_names=('cp','tp')), global shape torch.Size([32, 8, 3])"
    )
    code, out, _ = explain(text)
    assert code == 0
    assert "read: placements (_S(0, 4), S(1)); mesh axes ('cp', 'tp'), sizes not given; global shape (32, 8, 3) from the message" in out
    assert "dim 0 of size 32 is cut into 4 blocks of 8; each block is split across the cp ranks of mesh axis 0" in out
    assert "--mesh cp=N0,tp=N1 --shape 32,8,3" in out
    assert out.splitlines()[1].endswith("shard_order")  # torch's line, not the lines after it


def test_the_local_map_a_traceback_passes_through_is_named():
    traceback = (
        '  File "/venv/site-packages/torch/distributed/tensor/experimental/_func_map.py", line 250, in _local_map_wrapped\n'
        "    out = func(*local_args, **kwargs)\n"
        '  File "/home/me/kernels.py", line 7, in packed_attention\n'
        "    return out.view(-1, n, h)\n" + NOT_INTERPRETED
    )
    code, out, _ = explain(traceback)
    assert code == 0
    assert "through local_map(packed_attention): its out_placements label what the kernel returns" in out
