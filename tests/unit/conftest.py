"""Shared by the unit tests: torch 2.11's view algebra, simulated on any torch."""

from __future__ import annotations

import pytest

from dtensor_attn import _compat


@pytest.fixture
def torch211_view_algebra(monkeypatch):
    """Make DTensor's view algebra refuse every flatten, as torch 2.11's does for a sharded
    non-leading dim ("Attempted to flatten multiple dimensions, with dimension 1 being sharded"),
    and answer a split of packed tokens wrongly, leaving a strided shard on batch, as 2.11 does
    (measured on the H100)."""
    real = _compat.propagate_view_placements

    def refuse(placements, shape, rule, mesh_shape):
        if any(type(r).__name__ == "Flatten" for r in rule):
            raise RuntimeError("Attempted to flatten multiple dimensions, with dimension 1 being sharded.")
        needed, out = real(placements, shape, rule, mesh_shape)
        if any(type(r).__name__ == "Split" for r in rule):
            out = [_compat.strided_shard(0, 4) if type(p).__name__ == "Shard" and p.dim == 1 else p for p in out]
        return needed, out

    monkeypatch.setattr(_compat, "propagate_view_placements", refuse)
