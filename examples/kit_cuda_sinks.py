"""What the conformance kit reports on one GPU (device="cuda": simulated ranks, real kernels,
bf16) for attention sinks through the LSE, as gpt-oss applies them, and for torchtitan if it
imports on this machine. Paste the output into docs/gpu-results.md.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

Subjects: dtensor_attn's varlen with return_lse (keeps the LSE gradient) and torch's own
varlen_attn (drops it on GPU), each under SinksAttention (out * sigmoid(lse - sink)); then
examples/torchtitan_conformance.py's matrix with device="cuda" where torchtitan imports.
Run: ``python3 examples/kit_cuda_sinks.py`` (exit 0 when the verdicts are the expected ones).
"""

from __future__ import annotations

import pathlib
import sys

import torch

from dtensor_attn import AttentionConfig, Layout, LocalMapAttention, make_attention_masks
from dtensor_attn.config import Backend
from dtensor_attn.testing.kit import CallingConvention, FailureKind, Shapes, check_attention
from dtensor_attn.testing.kit.sinks import SinksAttention, sinks_transform
from dtensor_attn.testing.kit.torch_varlen import TorchVarlenWithLse

SHAPES = Shapes(batch=2, seq=256, num_q_heads=8, num_kv_heads_gqa=4, head_dim=64)
SINKS_N = torch.linspace(-1.0, 1.5, 8)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: this example runs the kit with device='cuda'", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    config = AttentionConfig(backend=Backend.VARLEN, return_lse=True, enable_gqa=True, varlen_output=Layout.BLNH)
    ours = SinksAttention(LocalMapAttention(config.build()), SINKS_N)
    kept = check_attention(ours, convention=CallingConvention(make_mask=lambda p: make_attention_masks(config, p),
                                                              out_transform=sinks_transform(SINKS_N)),
                           name="sinks on dtensor_attn varlen(return_lse)", meshes=("tp1", "tp2"), gqa=(True,),
                           shapes=SHAPES, device="cuda", cache_check=False)
    print(kept)
    torchs = check_attention(SinksAttention(TorchVarlenWithLse(), SINKS_N),
                             convention=CallingConvention(make_mask=lambda p: p, out_transform=sinks_transform(SINKS_N)),
                             name="sinks on torch varlen_attn", meshes=("tp1", "tp2"), gqa=(False, True), shapes=SHAPES,
                             device="cuda", cache_check=False)
    print(torchs)
    expected = kept.ok and {f.what for f in torchs.failures} == {"grad q", "grad k"} and all(
        f.kind is FailureKind.GRAD for f in torchs.failures)
    titan = pathlib.Path(__file__).with_name("torchtitan_conformance.py")
    sys.path.insert(0, str(titan.parent))
    try:
        import torchtitan_conformance
        print(f"torchtitan with device='cuda': exit {torchtitan_conformance.main(['--device', 'cuda'])}")
    except Exception as error:  # torchtitan may not import on this torch: say so, do not fail
        print(f"torchtitan with device='cuda': not run ({type(error).__name__}: {error})")
    print("verdicts as expected" if expected else "verdicts differ from the expected ones")
    return 0 if expected else 1


if __name__ == "__main__":
    sys.exit(main())
