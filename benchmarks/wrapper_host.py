"""Host time of LocalMapAttention on CPU: direct call, the peer pattern, and ours, in µs per call.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

    python3 benchmarks/wrapper_host.py            # both meshes, every backend (~1 minute)
    python3 benchmarks/wrapper_host.py --quick    # fewer samples, ~25 s (CI prints it on every run)

What a GPU hides behind a large kernel, the host pays on every call: this measures the host path
alone, at a tiny shape (B=1, L=16, 4 q / 2 k/v heads, H=8) where the CPU kernel costs a few µs,
so that the differences between the three variants are the wrapper's own work:

- direct: the inner attention on one rank's local tensors (the limit);
- peer: torch's ``local_map`` with the placements declared by hand (``Shard(2)`` on heads in and
  out), as a model wraps its attention;
- ours: ``LocalMapAttention``, every placement inferred.

Two meshes, each in its own process (each needs its own default process group): ``gloo1``, a
1-rank gloo process group (real DTensors, no simulation), and ``sim-tp2``, TP=2 on simulated
ranks (LocalTensorMode: every tensor op runs once per rank, so all three variants cost more).
Phases: ``fwd`` (grad enabled, as in training, graph dropped) and ``fwd+bwd``. Each number is the
minimum over ``--samples`` samples of ``--calls`` calls, the variants interleaved per sample:
the minimum is the run least disturbed by the rest of the machine. Only differences and ratios
within one run compare (docs/gpu-results.md records the GPU numbers from
benchmarks/wrapper_overhead.py). No number here is asserted anywhere.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import Shard
from torch.distributed.tensor.experimental import local_map

from dtensor_attn import AttentionConfig, LocalMapAttention
from dtensor_attn.backends import REGISTRY

SHAPE = (1, 16, 4, 2, 8)  # B, L, Nq, Nkv, H
MODES = ("gloo1", "sim-tp2")


def peer_pattern(inner, mesh):
    """What a model writes without dtensor_attn: local_map with the placements by hand."""
    heads = (Shard(2),) * mesh.ndim
    return local_map(
        inner, out_placements=list(heads), in_placements=(heads, heads, heads),
        in_grad_placements=(heads, heads, heads), device_mesh=mesh,
    )


def _inputs(mesh, tp: int):
    batch, seq, num_q_heads, num_kv_heads, head_dim = SHAPE
    gen = torch.Generator().manual_seed(0)
    full = [
        torch.randn(batch, seq, n, head_dim, generator=gen)
        for n in (num_q_heads, num_kv_heads, num_kv_heads, num_q_heads)
    ]
    placements = (Shard(2),) * mesh.ndim
    q_dt, k_dt, v_dt, grad_dt = (
        torch.distributed.tensor.distribute_tensor(t, mesh, placements) for t in full
    )
    dts = tuple(t.detach().requires_grad_() for t in (q_dt, k_dt, v_dt))
    locals_ = tuple(t.to_local().detach().requires_grad_() for t in (q_dt, k_dt, v_dt))
    return dts, grad_dt, locals_, grad_dt.to_local()


def train_step(fn, args, grad) -> None:
    """Forward and backward to the inputs. ``autograd.grad``, not ``backward()``: the inputs are
    leaves here, and storing a gradient into a DTensor leaf detaches it through DTensor's
    dispatch, which a model (whose q/k/v come out of projections) never pays, wrapped or not."""
    torch.autograd.grad(fn(*args), args, grad)


def _time_us(step, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - start) / calls * 1e6


def measure(mesh, tp: int, samples: int, calls: int) -> list[tuple]:
    rows = []
    dts, grad_dt, locals_, grad_local = _inputs(mesh, tp)
    for backend in REGISTRY:
        config = AttentionConfig(backend=backend, enable_gqa=True)
        inner = config.build()
        variants = {
            "direct": (inner, locals_, grad_local),
            "peer": (peer_pattern(inner, mesh), dts, grad_dt),
            "ours": (LocalMapAttention(inner), dts, grad_dt),
        }
        for phase in ("fwd", "fwd+bwd"):
            steps = {}
            for name, (fn, args, grad) in variants.items():
                if phase == "fwd":
                    steps[name] = lambda fn=fn, args=args: fn(*args)
                else:
                    steps[name] = lambda fn=fn, args=args, grad=grad: train_step(fn, args, grad)
            best = {name: float("inf") for name in steps}
            for name, step in steps.items():  # warm-up: plans, caches, allocator
                _time_us(step, 5)
            for _ in range(samples):
                for name, step in steps.items():
                    best[name] = min(best[name], _time_us(step, calls))
            rows.append((str(backend), phase, best["direct"], best["peer"], best["ours"]))
    return rows


def run_mode(mode: str, samples: int, calls: int) -> None:
    torch.set_num_threads(1)  # the host path is single-threaded; kernel threads only add noise
    if mode == "gloo1":
        # One rank: an in-process store, no port that another job on the runner may hold.
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
        mesh = dist.device_mesh.init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))
        rows = measure(mesh, 1, samples, calls)
        dist.destroy_process_group()
    else:
        from dtensor_attn.testing.harness.simulate import simulated_mesh

        with simulated_mesh({"tp": 2}) as mesh:  # a call costs ms here: a quarter of the calls
            rows = measure(mesh, 2, samples, max(1, calls // 4))
    for backend, phase, direct, peer, ours in rows:
        print(
            f"| {mode} | {backend} | {phase} | {direct:.1f} | {peer:.1f} (+{peer - direct:.1f}) | "
            f"{ours:.1f} (+{ours - direct:.1f}) | {ours / peer:.2f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, help="one mesh, in this process (default: each in its own)")
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="5 samples of 20 calls")
    args = parser.parse_args()
    samples, calls = (5, 20) if args.quick else (args.samples, args.calls)
    if args.mode:
        run_mode(args.mode, samples, calls)
        return
    print(f"# host µs per call, min of {samples} x {calls} calls; torch {torch.__version__}, "
          f"1 thread; shape (B, L, Nq, Nkv, H) = {SHAPE}")
    print("| mesh | backend | phase | direct | peer local_map (+ over direct) | ours (+ over direct) | ours / peer |")
    print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    failed = False
    for mode in MODES:
        cmd = [sys.executable, __file__, "--mode", mode, "--samples", str(samples), "--calls", str(calls)]
        failed |= subprocess.run(cmd, timeout=600).returncode != 0
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
