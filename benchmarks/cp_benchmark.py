"""Context parallel (CP) against one device, forward + backward, causal, in one run.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

    torchrun --nproc-per-node 2 benchmarks/cp_benchmark.py                         # GPUs, NCCL
    torchrun --nproc-per-node 2 benchmarks/cp_benchmark.py --device cpu --seq 256  # smoke, gloo

Rank 0 first times each kernel alone on the whole sequence (the one-device baseline) while the
other ranks wait; then every rank times each CP path on its seq chunk:
  ring        torch's _ContextParallel SDPA hooks (apply_context_parallel): k/v rotate between
              ranks inside torch's ring attention. CUDA only.
  all-gather  LocalMapAttention over full-mesh DTensors (q/k/v Shard(1) on cp): k/v are
              all-gathered at the local_map boundary, gradients reduce-scattered.
A CP time is the slowest rank's. ``ratio`` = CP time / one-device time (below 1 / cp: superlinear,
1 / cp: ideal). ``max |diff|`` compares the gathered CP output with the baseline output.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from dtensor_attn import AttentionConfig, LocalMapAttention
from dtensor_attn.context_parallel import ContextParallelError, apply_context_parallel
from dtensor_attn.load_balance import SeqOrder, permute_seq, seq_permutation, unpermute_seq

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--seq", type=int, default=32768, help="global sequence length L")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16, help="q heads")
    parser.add_argument("--kv-heads", type=int, default=16, help="k/v heads (fewer: GQA)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--allgather-backend", choices=("flex", "sdpa", "varlen"), default="flex",
                        help="inner attention of the all-gather path (the ring is always sdpa)")
    parser.add_argument("--no-load-balance", action="store_true", help="contiguous chunks, not head-tail")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    return parser.parse_args()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fwd_bwd(fn, leaves, args) -> tuple[float, torch.Tensor]:
    """Seconds per forward + backward (mean over ``iters`` after ``warmup``), and the last output."""
    out = None
    for i in range(args.warmup + args.iters):
        if i == args.warmup:
            synchronize(args.device)
            start = time.perf_counter()
        for leaf in leaves:
            leaf.grad = None
        out = fn()
        out.backward(torch.ones_like(out))
    synchronize(args.device)
    return (time.perf_counter() - start) / args.iters, out.detach()


def slowest(seconds: float, device: str) -> float:
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def main() -> None:
    args = parse_args()
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    mesh = init_device_mesh(args.device, (world,), mesh_dim_names=("cp",))
    dtype, causal = DTYPES[args.dtype], True
    order = SeqOrder.CONTIGUOUS if args.no_load_balance else SeqOrder.HEAD_TAIL

    # The same global q/k/v on every rank: one seed, drawn on the CPU, then moved.
    generator = torch.Generator().manual_seed(0)
    shape_q = (args.batch, args.seq, args.heads, args.head_dim)
    shape_kv = (args.batch, args.seq, args.kv_heads, args.head_dim)
    q_BLNH, k_BLNH, v_BLNH = (
        torch.randn(shape, generator=generator).to(device=args.device, dtype=dtype)
        for shape in (shape_q, shape_kv, shape_kv)
    )
    gqa = args.heads != args.kv_heads
    backends = {"ring": "sdpa", "all-gather": args.allgather_backend}

    # 1. One device: rank 0 alone, the whole sequence.
    baseline: dict[str, tuple[float, torch.Tensor]] = {}
    if rank == 0:
        for backend in sorted(set(backends.values())):
            inner = AttentionConfig(backend=backend, is_causal=causal, enable_gqa=gqa).build()
            leaves = [t.clone().requires_grad_() for t in (q_BLNH, k_BLNH, v_BLNH)]
            baseline[backend] = time_fwd_bwd(lambda: inner(*leaves), leaves, args)
            del leaves
    dist.barrier()

    # 2. CP over every rank: each path on its seq chunk (head-tail order when load-balanced).
    perm_L = seq_permutation(order, args.seq, world, device=args.device)
    shard_order_qkv = [permute_seq(t, perm_L, 1) for t in (q_BLNH, k_BLNH, v_BLNH)]
    rows = []
    for path, backend in backends.items():
        config = AttentionConfig(backend=backend, is_causal=causal, enable_gqa=gqa)
        try:
            if path == "ring":
                inner = config.build()
                apply_context_parallel(inner, mesh, seq_order=order)
                leaves = [distribute_tensor(t, mesh, (Shard(1),)).to_local().requires_grad_() for t in shard_order_qkv]
                run = lambda: inner(*leaves)  # noqa: E731
            else:
                attention = LocalMapAttention(config.build(), seq_order=order)
                leaves = [distribute_tensor(t, mesh, (Shard(1),)).requires_grad_() for t in shard_order_qkv]
                run = lambda: attention(*leaves)  # noqa: E731
        except ContextParallelError as error:  # e.g. the ring on CPU: refused up front, by design
            rows.append((path, backend, "not run", str(error).split(". Fix")[0]))
            continue
        dist.barrier()
        seconds, out = time_fwd_bwd(run, leaves, args)
        seconds = slowest(seconds, args.device)
        if not isinstance(out, DTensor):
            out = DTensor.from_local(out, mesh, (Shard(1),), run_check=False)
        out_BLNH = unpermute_seq(out.full_tensor(), perm_L, 1)
        rows.append((path, backend, seconds, out_BLNH))
        del leaves, out

    if rank == 0:
        print_table(rows, baseline, args, world)
    dist.destroy_process_group()


def print_table(rows, baseline, args, world) -> None:
    print(f"\nCP={world} vs one {args.device}: L={args.seq} B={args.batch} N={args.heads}/{args.kv_heads} "
          f"H={args.head_dim} {args.dtype} causal, load balance {'off' if args.no_load_balance else 'head-tail'}, "
          f"fwd+bwd, mean of {args.iters} after {args.warmup} warmup")
    header = f"{'path':<11} {'kernel':<7} {'1 dev ms':>9} {'CP ms':>9} {'ratio':>7} {'speedup':>8} {'max |diff|':>11}"
    print(header)
    print("-" * len(header))
    for path, backend, seconds, out_or_why in rows:
        one_s, one_out = baseline[backend]
        if seconds == "not run":
            print(f"{path:<11} {backend:<7} {one_s * 1e3:9.2f} {'-':>9}   not run: {out_or_why}")
            continue
        diff = (out_or_why.float() - one_out.float()).abs().max().item()
        print(f"{path:<11} {backend:<7} {one_s * 1e3:9.2f} {seconds * 1e3:9.2f} {seconds / one_s:7.3f} "
              f"{one_s / seconds:8.2f} {diff:11.3e}")


if __name__ == "__main__":
    main()
