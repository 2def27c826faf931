"""torchtitan 0.3.0's inner attentions through dtensor_attn's conformance kit, as torchtitan wraps them.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

Each module is configured with torchtitan's own ``set_gqa_inner_attention_local_map`` and set
up per mesh by its own ``Module.parallelize(ParallelDims(..., spmd_backend="full_dtensor"))``:
nothing of its sharding is re-implemented here. What the kit needs to know is stated once:

- the calling convention: torchtitan's inner attentions take ``attention_masks=`` (flex: a
  ``BlockMask`` per CP rank, whose queries are the rank's chunk of the sequence; sdpa: none)
  and ``enable_gqa=``/``scale=`` from the GQA block;
- the set-up: ``prepare`` builds ParallelDims for the case's axes and parallelizes the module;
  the kit places the inputs on torchtitan's mesh (its ``dp_shard`` axis shards batch);
- shapes: a sequence of 256, so every CP rank's chunk is whole flex blocks of 128.

Simulated ranks in one process, on CPU (torchtitan builds its meshes on an accelerator, so the
example points its device type at the kit's device). One line per module and mesh; exit 0 when
the verdicts are the expected ones: FlexAttention passes every mesh; ScaledDotProductAttention
passes TP and fails on every CP mesh, with the wrong shards on the CP ranks above 0 only (it
calls sdpa with is_causal=True on the rank's query chunk against the gathered keys); no
false alarm on tp1. Run: ``python examples/torchtitan_conformance.py`` (install: docs/kit.md).
"""

from __future__ import annotations

import argparse
import sys
from unittest import mock

from dtensor_attn.testing.kit import CallingConvention, MaskScope, Prepared, Shapes, Status, check_attention

MESHES = ({"tp": 1}, {"tp": 2}, {"cp": 2}, {"cp": 2, "tp": 2}, {"dp_shard": 2, "cp": 2})
SHAPES = Shapes(batch=2, seq=256, num_q_heads=8, num_kv_heads_gqa=4, head_dim=16)


def torchtitan_prepare(module, context):
    """torchtitan's own set-up of an inner attention for the case's mesh."""
    import torchtitan.distributed.parallel_dims as parallel_dims

    axes = context.axes
    dims = parallel_dims.ParallelDims(
        dp_replicate=axes.get("dp_replicate", 1), dp_shard=axes.get("dp_shard", 1), cp=axes.get("cp", 1),
        tp=axes.get("tp", 1), pp=1, ep=1, world_size=context.mesh.size(), spmd_backend="full_dtensor",
    )
    with mock.patch.object(parallel_dims, "device_type", context.device.type):
        dims.build_mesh()
    module.parallelize(dims)
    return Prepared(module, dims.spmd_meshes()[0])


def flex_block_mask(view):
    """The rank's BlockMask as torchtitan's decoder builds it (causal and packed documents), with
    the queries of this rank's sequence chunk: what torch's CP block mask does with the CP rank."""
    from torch.nn.attention.flex_attention import and_masks, create_block_mask
    from torchtitan.models.common.attention import get_causal_mask_mod, get_efficient_causal_mask_mod_for_packed_document

    mask_mods = [get_causal_mask_mod()]
    if view.positions_BL is not None:
        mask_mods.append(get_efficient_causal_mask_mod_for_packed_document(view.positions_BL))
    mask_mod, q_index_L = and_masks(*mask_mods), view.q_index_L

    def rank_mask_mod(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_index_L[q_idx], kv_idx)

    batch = None if view.positions_BL is None else view.positions_BL.shape[0]
    return create_block_mask(rank_mask_mod, batch, None, len(q_index_L), len(view.kv_index_L), device=view.device)


def no_masks(view):
    raise ValueError("torchtitan's ScaledDotProductAttention applies no attention_masks (it raises for any)")


def gqa_block_kwargs(case):
    """What torchtitan's GQAttention passes its inner attention besides the mask."""
    return {"enable_gqa": case.gqa, "scale": case.shapes.scale}


def subjects():
    from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention
    from torchtitan.models.common.decoder_sharding import set_gqa_inner_attention_local_map

    for module_cls, make_mask in ((FlexAttention, flex_block_mask), (ScaledDotProductAttention, no_masks)):
        config = module_cls.Config()
        set_gqa_inner_attention_local_map(config)
        convention = CallingConvention(mask_keyword="attention_masks", make_mask=make_mask, mask_scope=MaskScope.PER_RANK,
                                       mask_for_causal=module_cls is FlexAttention, extra_kwargs=gqa_block_kwargs)
        yield module_cls.__name__, config.build(), convention


def run(meshes=MESHES, device: str = "cpu"):
    """{(module name, mesh id): ConformanceResult}, and print one line per module and mesh."""
    results = {}
    for name, module, convention in subjects():
        for axes in meshes:
            result = check_attention(module, convention=convention, name=name, prepare=torchtitan_prepare, shapes=SHAPES,
                                     meshes=(axes,), combinations="all", cache_check=len(axes) > 1 and "tp" in axes,
                                     device=device)
            mesh_name = "x".join(f"{a}{s}" for a, s in axes.items())
            results[name, mesh_name] = result
            print(line(name, mesh_name, result))
    return results


def line(name: str, mesh_name: str, result) -> str:
    counts = result.counts()
    text = f"{name:<26} {mesh_name:<14} pass {counts['pass']}  fail {counts['fail']}  skip {counts['skip']}"
    if counts["not_exercised"]:
        text += f"  not exercised {counts['not_exercised']}"
    kinds = sorted({f.what if f.what.startswith(str(f.kind)) else f"{f.kind} of {f.what}" for f in result.failures})
    bad_shards = sorted({r for f in result.failures for r in f.shard_ranks})
    if kinds:
        text += f"  [{'; '.join(kinds)}]"
    if bad_shards:
        text += f"  wrong shards on ranks {bad_shards}"
    return text


def unexpected(results) -> list[str]:
    """What differs from the expected verdicts (module docstring); [] when all are as expected."""
    problems = []
    for (name, mesh_name), result in results.items():
        matrix = [c for c in result.cases if not c.mesh.startswith("cache-")]
        failed = [c for c in matrix if c.status is Status.FAIL]
        probe_passed = all(c.status is not Status.FAIL for c in result.cases if c.mesh.startswith("cache-"))
        if name == "FlexAttention" or "cp" not in mesh_name:
            if failed or not probe_passed or not any(c.status is Status.PASS for c in matrix):
                problems.append(f"{name} {mesh_name}: expected every case to pass; {result.summary()}\n{result.table()}")
            continue
        # sdpa under CP: every causal case fails, and only the shards of CP ranks > 0 are wrong
        causal = [c for c in matrix if c.mask == "causal"]
        cp_above_0 = _cp_ranks_above_0(mesh_name)
        shards = {r for c in causal for f in c.failures for r in f.shard_ranks}
        if not causal or any(c.status is not Status.FAIL for c in causal) or shards != cp_above_0:
            problems.append(f"{name} {mesh_name}: expected every causal case to fail with wrong shards on ranks "
                            f"{sorted(cp_above_0)}, got {sorted(shards)}; {result.summary()}\n{result.table()}")
    return problems


def _cp_ranks_above_0(mesh_name: str) -> set[int]:
    """Ranks whose cp coordinate is above 0 on the mesh (axes in the order of mesh_name)."""
    import math
    import re

    axes = [(name, int(size)) for name, size in re.findall(r"([a-z_]+?)(\d+)(?:x|$)", mesh_name)]
    names, sizes = [a for a, _ in axes], [s for _, s in axes]
    ranks = set()
    for rank in range(math.prod(sizes)):
        coords, rest = [], rank
        for size in reversed(sizes):
            coords.insert(0, rest % size)
            rest //= size
        if coords[names.index("cp")] > 0:
            ranks.add(rank)
    return ranks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: simulated ranks on one GPU")
    args = parser.parse_args(argv)
    try:
        import torchtitan.models.common.attention  # noqa: F401
        import torchtitan.models.common.decoder_sharding  # noqa: F401
    except ImportError as error:
        print(f"torchtitan is not importable here ({error}); install: see docs/kit.md", file=sys.stderr)
        return 2
    problems = unexpected(run(device=args.device))
    for problem in problems:
        print(f"UNEXPECTED: {problem}")
    print("verdicts as expected" if not problems else f"{len(problems)} verdicts differ from the expected ones")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
