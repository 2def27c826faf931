"""dtensor_attn: placement-correct attention for DTensor, its test harness, and a placement debugger."""

from dtensor_attn.errors import PlacementError
from dtensor_attn.layout import Dim, Layout
from dtensor_attn.placements import infer_out_placements

__all__ = ["Dim", "Layout", "PlacementError", "infer_out_placements"]
