"""What LocalMapAttention costs over calling the inner attention on local tensors directly.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

Run (2 GPUs, TP=2):  torchrun --nproc-per-node 2 benchmarks/wrapper_overhead.py
One GPU, TP=2 shards: torchrun --nproc-per-node 1 benchmarks/wrapper_overhead.py --shard-heads 2
  (a 1-rank mesh whose local tensors have the shapes of one TP=2 rank: in TP the wrapper runs
  no collective, so this measures the same per-rank work and wrapper path)
CPU smoke check:     torchrun --nproc-per-node 2 benchmarks/wrapper_overhead.py --device cpu --small-only

For each backend and shape: forward + backward time of the wrapped call on TP DTensors
(Shard(2) on heads) over the direct call on the same local shards (the ratio; goal <= 1.03 at
the large shape), and the host time per forward call in microseconds (no device sync inside
the timed region, so it is what the CPU spends issuing the call). Each time is a run of
``--repeats`` steps queued back to back (as a model's layers are), median of 5 such runs; both
variants run interleaved in one process so that they share clocks and caches.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from dtensor_attn import AttentionConfig, LocalMapAttention
from dtensor_attn.backends import REGISTRY

SHAPES = {"large": (4, 4096, 32, 8, 128), "small": (1, 128, 8, 2, 64)}  # B, L, Nq, Nkv, H


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step(fn, args, grad) -> None:
    out = fn(*args)
    out.backward(grad)


def _time_steps(fn, args, grad, device, repeats: int) -> float:
    """Seconds per forward + backward, ``repeats`` steps queued back to back between two syncs,
    as the layers of a training step are: host work overlaps device work, as it does there."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        _step(fn, args, grad)
    _sync(device)
    return (time.perf_counter() - start) / repeats


def _host_forward_us(fn, args, device, calls: int) -> float:
    """Microseconds the host spends issuing one forward (no sync inside the loop)."""
    with torch.no_grad():
        for _ in range(3):  # no-grad calls may pick other kernels: warm those up too
            fn(*args)
        _sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        elapsed = time.perf_counter() - start
        _sync(device)
    return elapsed / calls * 1e6


def bench(backend, shape_name, mesh, device, dtype, repeats, shard_heads):
    batch, seq, num_q_heads, num_kv_heads, head_dim = SHAPES[shape_name]
    tp = max(mesh.size(), shard_heads)
    config = AttentionConfig(backend=backend, enable_gqa=num_q_heads != num_kv_heads)
    inner = config.build()
    wrapped = LocalMapAttention(inner)
    gen = torch.Generator(device=device).manual_seed(dist.get_rank())

    def local(n):
        return torch.randn(batch, seq, n // tp, head_dim, device=device, dtype=dtype, generator=gen).requires_grad_()

    q_BLNH, k_BLNH, v_BLNH = local(num_q_heads), local(num_kv_heads), local(num_kv_heads)
    grad_BLNH = torch.randn_like(q_BLNH)
    direct_args = (q_BLNH, k_BLNH, v_BLNH)
    dt_args = tuple(DTensor.from_local(t.detach(), mesh, (Shard(2),)).requires_grad_() for t in direct_args)
    grad_dt = DTensor.from_local(grad_BLNH, mesh, (Shard(2),))
    for _ in range(3):  # warm-up: compilation, plan cache, allocator
        _step(inner, direct_args, grad_BLNH)
        _step(wrapped, dt_args, grad_dt)
    direct_s, wrapped_s = [], []
    for _ in range(5):  # interleave the two so drift hits both
        direct_s.append(_time_steps(inner, direct_args, grad_BLNH, device, repeats))
        wrapped_s.append(_time_steps(wrapped, dt_args, grad_dt, device, repeats))
    host_direct = _host_forward_us(inner, direct_args, device, 50)
    host_wrapped = _host_forward_us(wrapped, dt_args, device, 50)
    d, w = statistics.median(direct_s), statistics.median(wrapped_s)
    return d, w, host_direct, host_wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small-only", action="store_true", help="skip the large shape (CPU smoke check)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--shard-heads", type=int, default=1, help="local heads = heads / max(world size, this)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(__import__("os").environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("tp",))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for shape_name in (["small"] if args.small_only else ["large", "small"]):
        for backend in REGISTRY:
            if device.type == "cpu" and backend.value != "sdpa":
                continue  # CPU flex/varlen are the math kernel: not what this measures
            d, w, hd, hw = bench(backend, shape_name, mesh, device, dtype, args.repeats, args.shard_heads)
            rows.append((str(backend), shape_name, d * 1e3, w * 1e3, w / d, hd, hw))
    if dist.get_rank() == 0:
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        tp = max(mesh.size(), args.shard_heads)
        print(f"# {name} x{dist.get_world_size()}, torch {torch.__version__}, {dtype}, local shards of TP={tp}")
        print("| backend | shape | direct fwd+bwd ms | wrapped fwd+bwd ms | ratio | host fwd us direct | host fwd us wrapped |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for backend, shape_name, d, w, ratio, hd, hw in rows:
            print(f"| {backend} | {shape_name} {SHAPES[shape_name]} | {d:.3f} | {w:.3f} | {ratio:.3f} | {hd:.0f} | {hw:.0f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
