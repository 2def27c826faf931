"""The one exception callers see for a placement or layout mistake."""

from __future__ import annotations


class PlacementError(ValueError):
    """A DTensor placement or layout that the attention cannot take or produce.

    The message names the module, the layout, the expected and the actual placements or
    shapes, and the fix. Subclasses ValueError so that generic input validation catches it.
    """
