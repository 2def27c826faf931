"""What LocalMapAttention costs over the direct call, next to the peer pattern (torch's local_map).

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

Run (2 GPUs, TP=2):  torchrun --nproc-per-node 2 benchmarks/wrapper_overhead.py
One GPU, TP=2 shards: torchrun --nproc-per-node 1 benchmarks/wrapper_overhead.py --shard-heads 2
  (a 1-rank mesh whose local tensors have the shapes of one TP=2 rank: in TP the wrapper runs
  no collective, so this measures the same per-rank work and wrapper path)
CPU smoke check:     torchrun --nproc-per-node 2 benchmarks/wrapper_overhead.py --device cpu --small-only
CPU host path alone: python3 benchmarks/wrapper_host.py (no GPU, no torchrun)

Three variants on the same local shards: direct (the inner attention on local tensors: the
limit), peer (torch's ``local_map`` with ``Shard(2)`` on heads declared by hand, as a model
wraps its attention) and ours (``LocalMapAttention`` on TP DTensors, placements inferred).
For each backend and shape:
- fwd+bwd ratios to direct: ``--repeats`` steps queued back to back between two syncs (as a
  model's layers are), median of 5 such runs, the three variants interleaved so that they share
  clocks and caches (goal: ours <= 1.01 at the large shape);
- host µs per call: what the CPU spends issuing a forward (grad enabled, as in training) and a
  forward + backward, with no sync inside the timed calls; the minimum of 25 samples of 20
  calls, the variants interleaved in every sample (the sample least disturbed). Host time is what a small shape exposes; at the large
  shape the device queue can fill and stall the host, so read host columns at the small shape.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from dtensor_attn import AttentionConfig, LocalMapAttention
from dtensor_attn.backends import REGISTRY

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from wrapper_host import peer_pattern, train_step  # noqa: E402  (one home for both)

SHAPES = {"large": (4, 4096, 32, 8, 128), "small": (1, 128, 8, 2, 64)}  # B, L, Nq, Nkv, H


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_steps(fn, args, grad, device, repeats: int) -> float:
    """Seconds per forward + backward, ``repeats`` steps queued back to back between two syncs,
    as the layers of a training step are: host work overlaps device work, as it does there."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        train_step(fn, args, grad)
    _sync(device)
    return (time.perf_counter() - start) / repeats


def _host_us(steps: dict, device, calls: int = 20, samples: int = 25) -> dict:
    """Microseconds the host spends issuing one call of each step (no sync inside the timed
    calls): the minimum over ``samples``, the steps interleaved in every sample so that a busy
    moment of the machine hits all of them, not one."""
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(samples):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(calls):
                step()
            best[name] = min(best[name], time.perf_counter() - start)
    _sync(device)
    return {name: seconds / calls * 1e6 for name, seconds in best.items()}


def bench(backend, shape_name, mesh, device, dtype, repeats, shard_heads):
    batch, seq, num_q_heads, num_kv_heads, head_dim = SHAPES[shape_name]
    tp = max(mesh.size(), shard_heads)
    config = AttentionConfig(backend=backend, enable_gqa=num_q_heads != num_kv_heads)
    inner = config.build()
    gen = torch.Generator(device=device).manual_seed(dist.get_rank())

    def local(n):
        return torch.randn(batch, seq, n // tp, head_dim, device=device, dtype=dtype, generator=gen).requires_grad_()

    q_BLNH, k_BLNH, v_BLNH = local(num_q_heads), local(num_kv_heads), local(num_kv_heads)
    grad_BLNH = torch.randn_like(q_BLNH)
    direct_args = (q_BLNH, k_BLNH, v_BLNH)
    dt_args = tuple(DTensor.from_local(t.detach(), mesh, (Shard(2),)).requires_grad_() for t in direct_args)
    grad_dt = DTensor.from_local(grad_BLNH, mesh, (Shard(2),))
    variants = {
        "direct": (inner, direct_args, grad_BLNH),
        "peer": (peer_pattern(inner, mesh), dt_args, grad_dt),
        "ours": (LocalMapAttention(inner), dt_args, grad_dt),
    }
    for _ in range(3):  # warm-up: compilation, plan cache, allocator
        for fn, args, grad in variants.values():
            train_step(fn, args, grad)
    step_s = {name: [] for name in variants}
    for _ in range(5):  # interleave the variants so drift hits all of them
        for name, (fn, args, grad) in variants.items():
            step_s[name].append(_time_steps(fn, args, grad, device, repeats))
    result = {name: {"step": statistics.median(times)} for name, times in step_s.items()}
    forward = {name: (lambda fn=fn, args=args: fn(*args)) for name, (fn, args, grad) in variants.items()}
    train = {name: (lambda fn=fn, args=args, grad=grad: train_step(fn, args, grad)) for name, (fn, args, grad) in variants.items()}
    for phase, steps in (("fwd", forward), ("fwd+bwd", train)):
        for name, us in _host_us(steps, device).items():
            result[name][phase] = us
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small-only", action="store_true", help="skip the large shape (CPU smoke check)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--shard-heads", type=int, default=1, help="local heads = heads / max(world size, this)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("tp",))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for shape_name in (["small"] if args.small_only else ["large", "small"]):
        for backend in REGISTRY:
            if device.type == "cpu" and backend.value != "sdpa":
                continue  # CPU flex/varlen are the math kernel: not what this measures
            rows.append((str(backend), shape_name, bench(backend, shape_name, mesh, device, dtype, args.repeats, args.shard_heads)))
    if dist.get_rank() == 0:
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        tp = max(mesh.size(), args.shard_heads)
        print(f"# {name} x{dist.get_world_size()}, torch {torch.__version__}, {dtype}, local shards of TP={tp}")
        print("| backend | shape | direct fwd+bwd ms | ratio peer | ratio ours | host fwd µs direct / peer / ours "
              "| host fwd+bwd µs direct / peer / ours |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for backend, shape_name, r in rows:
            d = r["direct"]["step"]
            host = {phase: " / ".join(f"{r[v][phase]:.0f}" for v in ("direct", "peer", "ours")) for phase in ("fwd", "fwd+bwd")}
            print(
                f"| {backend} | {shape_name} {SHAPES[shape_name]} | {d * 1e3:.3f} | {r['peer']['step'] / d:.3f} | "
                f"{r['ours']['step'] / d:.3f} | {host['fwd']} | {host['fwd+bwd']} |"
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
