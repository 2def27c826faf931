"""What keeping varlen's LSE gradient costs: forward + backward with and without the LSE in the loss.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

Run on a GPU: python3 benchmarks/varlen_lse_grad.py   (CPU: --device cpu --shape small, the
flash stand-in, a smoke check of the script only)

Three variants of VarlenAttention (BLNH, causal, GQA) on the same inputs, interleaved in one
process (shared clocks and caches), median of 5 runs of ``--repeats`` queued steps each:
- ``out``: return_lse=False, loss on the output (torch's own varlen autograd formula);
- ``lse unused``: return_lse=True, loss on the output only (our formula, LSE gradient None);
- ``out+lse``: return_lse=True, loss on the output and the LSE (our formula with the padded
  flash backward that carries the LSE gradient).
Ratios are to ``out``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from dtensor_attn import AttentionConfig
from dtensor_attn.backends import VarlenAttention

SHAPES = {"large": (4, 4096, 32, 8, 128), "small": (1, 128, 8, 2, 64)}  # B, L, Nq, Nkv, H
VARIANTS = ("out", "lse unused", "out+lse")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step(module, variant, leaves, grad_out, grad_lse):
    outputs = module(*leaves)
    if variant == "out":
        outputs.backward(grad_out)
    elif variant == "lse unused":
        outputs[0].backward(grad_out)
    else:
        torch.autograd.backward(outputs, (grad_out, grad_lse))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="large")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    batch, seq, num_q_heads, num_kv_heads, head_dim = SHAPES[args.shape]
    gen = torch.Generator(device=device).manual_seed(0)
    leaves = [
        torch.randn(batch, seq, n, head_dim, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
        for n in (num_q_heads, num_kv_heads, num_kv_heads)
    ]
    grad_out = torch.randn_like(leaves[0])
    grad_lse = torch.randn(batch, seq, num_q_heads, device=device, generator=gen)
    modules = {
        variant: AttentionConfig(backend="varlen", enable_gqa=True, return_lse=variant != "out").build()
        for variant in VARIANTS
    }
    stand_in = contextlib.nullcontext()
    if device.type == "cpu":  # a smoke check of the script: the flash stand-in, the native path
        from dtensor_attn.testing.flash_stand_in import flash_varlen_on_cpu

        VarlenAttention.native_kernel_available = lambda self, device: True
        stand_in = flash_varlen_on_cpu()
    with stand_in:
        times = {variant: [] for variant in VARIANTS}
        for _ in range(2):  # warm-up
            for variant in VARIANTS:
                _step(modules[variant], variant, leaves, grad_out, grad_lse)
        for _ in range(5):
            for variant in VARIANTS:
                _sync(device)
                start = time.perf_counter()
                for _ in range(args.repeats):
                    _step(modules[variant], variant, leaves, grad_out, grad_lse)
                _sync(device)
                times[variant].append((time.perf_counter() - start) / args.repeats)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# {name}, torch {torch.__version__}, bf16, varlen BLNH causal GQA, shape (B, L, Nq, Nkv, H) = {SHAPES[args.shape]}")
    print("| variant | fwd+bwd ms | ratio to out |")
    print("| --- | --- | --- |")
    base = statistics.median(times["out"])
    for variant in VARIANTS:
        ms = statistics.median(times[variant])
        print(f"| {variant} | {ms * 1e3:.3f} | {ms / base:.3f} |")


if __name__ == "__main__":
    main()
