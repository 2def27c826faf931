"""The floor under any local_map-style wrapper: what one Python autograd node costs on this host.

    python3 benchmarks/autograd_node_cost.py              # on a GPU if there is one, else CPU
    python3 benchmarks/autograd_node_cost.py --device cpu

Every DTensor boundary (torch's ``to_local``/``from_local``, ``local_map``, dtensor_attn's
``LocalBoundary``) is a Python ``torch.autograd.Function``: one node where tensors enter the local
world, one where they leave. This measures what such a node costs by itself, with an identity
Function (a view forward, the gradient passed through), on one small tensor, and what the two
DTensor boundaries cost around the same op on a 1-rank mesh:

- ``fwd``: issuing ``y = f(x) * 2`` with grad enabled, graph dropped;
- ``fwd+bwd``: the same and ``torch.autograd.grad(y, x, g)``.

Columns: the C++ op alone, then with 1, 2 and 4 identity nodes in the chain, then the op between
torch's ``to_local(grad_placements=...)`` and ``from_local(run_check=False)``, then between
``LocalBoundary.unwrap`` and ``wrap`` (what LocalMapAttention runs); each as µs over the op alone.
Two nodes are the floor of any boundary. On a GPU the backward of a Python node runs on the
device's autograd thread, which must take the GIL; on CPU it runs on the calling thread. Host µs:
the minimum over ``--samples`` samples of ``--calls`` calls, the columns interleaved per sample;
no sync inside the timed calls. Nothing here is asserted; docs/gpu-results.md records the GPU
numbers.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from dtensor_attn._compat import LocalBoundary

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from wrapper_overhead import _host_us  # noqa: E402  (one home for the interleaved minimum)


class Identity(torch.autograd.Function):
    """The least a boundary node can do: a view forward, the gradient passed through."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def chain(x: torch.Tensor, nodes: int) -> torch.Tensor:
    """``x * 2`` with ``nodes`` identity nodes, split before and after the op as a wrapper's are."""
    for _ in range((nodes + 1) // 2):
        x = Identity.apply(x)
    y = x * 2
    for _ in range(nodes // 2):
        y = Identity.apply(y)
    return y


def boundary_steps(x_BLNH: torch.Tensor, grad_BLNH: torch.Tensor) -> dict:
    """The op between torch's public boundary, and between LocalBoundary's, on a 1-rank mesh."""
    mesh = dist.device_mesh.init_device_mesh(x_BLNH.device.type, (1,), mesh_dim_names=("tp",))
    heads = (Shard(2),)
    x_dt = DTensor.from_local(x_BLNH.detach(), mesh, heads).requires_grad_()
    grad_dt = DTensor.from_local(grad_BLNH, mesh, heads)
    boundary = LocalBoundary()

    def public() -> DTensor:
        return DTensor.from_local(x_dt.to_local(grad_placements=heads) * 2, mesh, heads, run_check=False)

    def ours() -> DTensor:
        return boundary.wrap(0, boundary.unwrap([x_dt], [heads])[0] * 2, mesh, heads)

    steps = {}
    for name, fn in (("torch", public), ("ours", ours)):
        steps[("fwd", name)] = fn
        steps[("fwd+bwd", name)] = lambda fn=fn: torch.autograd.grad(fn(), x_dt, grad_dt)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=25)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(1)
    # One rank: an in-process store, no port that another job on the runner may hold.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                            store=dist.HashStore())
    x_BLNH = torch.randn(1, 128, 8, 64, device=device, requires_grad=True)
    grad_BLNH = torch.randn_like(x_BLNH)
    counts = (0, 1, 2, 4)
    steps = {}
    for nodes in counts:
        steps[("fwd", nodes)] = lambda n=nodes: chain(x_BLNH, n)
        steps[("fwd+bwd", nodes)] = lambda n=nodes: torch.autograd.grad(chain(x_BLNH, n), x_BLNH, grad_BLNH)
    steps.update(boundary_steps(x_BLNH, grad_BLNH))
    for step in steps.values():  # warm-up
        for _ in range(20):
            step()
    us = _host_us(steps, device, calls=args.calls, samples=args.samples)
    dist.destroy_process_group()
    print(f"# torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    columns = [f"+{n} node{'s' if n > 1 else ''}" for n in counts[1:]]
    print("| phase | op alone µs | " + " | ".join(columns) + " | µs per node | torch's to_local/from_local "
          "| LocalBoundary |")
    print("| --- | --- | " + " | ".join("---" for _ in columns) + " | --- | --- | --- |")
    for phase in ("fwd", "fwd+bwd"):
        alone = us[(phase, 0)]
        extra = [us[(phase, n)] - alone for n in counts[1:]]
        print(f"| {phase} | {alone:.1f} | " + " | ".join(f"+{e:.1f}" for e in extra)
              + f" | {extra[-1] / counts[-1]:.1f} | +{us[(phase, 'torch')] - alone:.1f} "
              f"| +{us[(phase, 'ours')] - alone:.1f} |")


if __name__ == "__main__":
    main()
