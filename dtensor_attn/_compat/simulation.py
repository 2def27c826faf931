"""Simulated ranks: LocalTensor and its mode, the fake store, per-rank tensors, torch's CP all-gather taught to simulated ranks.

Part of dtensor_attn._compat, the one home of private torch imports; import names from the
package, not from here."""

from __future__ import annotations


import torch

# Simulated ranks: LocalTensor holds one tensor per rank inside one process.
from torch.distributed._local_tensor import (  # noqa: F401  (re-exported)
    LocalTensor,
    LocalTensorMode,
    maybe_disable_local_tensor_mode,
)
from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: F401


def local_tensor_mode_active() -> bool:
    """True inside a simulated-ranks region (a LocalTensorMode is on the dispatch stack)."""
    from torch.distributed._local_tensor import local_tensor_mode

    return local_tensor_mode() is not None


def rank_tensors(tensor: torch.Tensor) -> dict[int, torch.Tensor]:
    """Each simulated rank's tensor inside a LocalTensor; ``{0: tensor}`` for a plain tensor."""
    if isinstance(tensor, LocalTensor):
        return dict(tensor._local_tensors)
    return {0: tensor}
