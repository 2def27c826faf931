"""What ``check_attention`` found: one outcome per case, each failure naming what differed.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

A failure says which case (``varlen-TNH-cp2xtp2-gqa``), what kind of difference (values,
global shape, placements, gradients, cached state, or an exception), what was expected and
what was found, and on which ranks. ``ConformanceResult.raise_for_failures()`` turns the
failures into one readable table for pytest.
"""

from __future__ import annotations

import dataclasses
import enum

from dtensor_attn.testing.golden import format_table

_DETAIL_WIDTH = 200  # table cells; the full text stays on the failure


class FailureKind(enum.Enum):
    """What differed in a case."""

    ERROR = "error"  # the subject, or an op on its output (full_tensor, backward), raised
    SHAPE = "shape"  # the global shape is no layout the contract allows (BLNH or TNH; LSE: BLN, BNL, TN)
    PLACEMENTS = "placements"  # the placements differ from those of the layout the shape implies
    VALUES = "values"  # some rank's full tensor differs from the float64 reference
    GRAD_PLACEMENTS = "grad_placements"  # an input gradient is not placed like its input
    GRAD = "grad"  # an input gradient is missing or differs from the reference on some rank
    CACHED_STATE = "cached_state"  # a reused subject fails a call that a fresh subject passes
    MASK_NO_EFFECT = "mask_no_effect"  # a document case returned the causal-only result: the mask was not applied

    def __str__(self) -> str:
        return self.value


class Status(enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"  # the case does not apply (no document masks, a torch limit): the reason says why
    NOT_EXERCISED = "not_exercised"  # it ran, but tested nothing (every call failed for a fresh subject too)

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True, slots=True)
class CaseFailure:
    """One difference in one case.

    ``ranks``: ranks whose full tensor differs. ``shard_ranks``: ranks whose own local shard
    differs from the slice of the reference its placements name (with CP, a mistake in the
    per-rank offset leaves rank 0's shard right: a check of rank 0 alone would pass).
    """

    case: str
    kind: FailureKind
    what: str  # "output", "lse", "grad k", "call 2 of 5", "subject"
    expected: str
    actual: str
    ranks: tuple[int, ...] = ()
    shard_ranks: tuple[int, ...] = ()
    max_err: float | None = None
    detail: str = ""

    def describe(self) -> str:
        """One line: ``case: kind of what: expected ..., actual ... (ranks ...); detail``."""
        text = f"{self.case}: {self.kind} of {self.what}: expected {self.expected}, actual {self.actual}"
        if self.ranks:
            text += f" on ranks {list(self.ranks)}"
        if self.max_err is not None:
            text += f" (max abs err {self.max_err:.3e})"
        if self.shard_ranks:
            text += f"; wrong shards on ranks {list(self.shard_ranks)}"
        return text + (f"; {self.detail}" if self.detail else "")


@dataclasses.dataclass(frozen=True, slots=True)
class CaseOutcome:
    """One case of the matrix: its id, coordinates, status and what it observed."""

    id: str
    variant: str  # "varlen-TNH", or the subject's name
    kernel: str  # "varlen[math]" where the math kernel ran; "" if the subject does not say
    mesh: str  # "cp2xtp2", or "cache-cp2xtp2" for the cached-state probe
    heads: str  # "mha" or "gqa"
    mask: str  # "causal" or "docs"
    lse: bool | None  # None: the subject decides
    status: Status
    reason: str = ""  # why it was skipped or not exercised
    in_placements: str = ""
    out_placements: str = ""  # as the subject returned them
    expected_out_placements: str = ""
    failures: tuple[CaseFailure, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class ConformanceResult:
    subject: str
    cases: tuple[CaseOutcome, ...]

    @property
    def failures(self) -> list[CaseFailure]:
        return [f for case in self.cases for f in case.failures]

    @property
    def ok(self) -> bool:
        """No failure and nothing left unexercised: a probe that tested nothing is not a pass."""
        return not self.failures and not self.with_status(Status.NOT_EXERCISED)

    def with_status(self, status: Status) -> list[CaseOutcome]:
        return [c for c in self.cases if c.status is status]

    def counts(self) -> dict[str, int]:
        return {str(s): len(self.with_status(s)) for s in Status}

    def failures_of(self, kind: FailureKind | None = None, *, case: str | None = None) -> list[CaseFailure]:
        """Failures of one kind and/or one case id."""
        return [f for f in self.failures if (kind is None or f.kind is kind) and (case is None or f.case == case)]

    def failed_ids(self, kind: FailureKind | None = None) -> list[str]:
        return list(dict.fromkeys(f.case for f in self.failures_of(kind)))

    def case(self, case_id: str) -> CaseOutcome:
        for c in self.cases:
            if c.id == case_id:
                return c
        raise KeyError(f"no case {case_id!r} in this result; ids: {[c.id for c in self.cases][:8]} ...")

    def table(self) -> str:
        """The failing cases as aligned columns, one line per failure."""
        rows = [("case", "kind", "what", "expected", "actual", "ranks", "detail")]
        for f in self.failures:
            ranks = ",".join(map(str, f.ranks))
            if f.shard_ranks:
                ranks += f" (shards {','.join(map(str, f.shard_ranks))})"
            detail = f.detail if f.max_err is None else f"max abs err {f.max_err:.2e}; {f.detail}"
            detail = " ".join(detail.split())
            if len(detail) > _DETAIL_WIDTH:
                detail = detail[: _DETAIL_WIDTH - 3] + "..."
            rows.append((f.case, str(f.kind), f.what, f.expected, f.actual, ranks or "-", detail))
        return format_table(rows)

    def summary(self) -> str:
        counts = self.counts()
        skipped = sorted({c.reason for c in self.with_status(Status.SKIP)})
        unexercised = [f"{c.id}: {c.reason}" for c in self.with_status(Status.NOT_EXERCISED)]
        text = (
            f"check_attention({self.subject}): {counts['pass']} passed, {counts['fail']} failed, "
            f"{counts['skip']} skipped"
        )
        if unexercised:
            text += f", {len(unexercised)} not exercised"
        text += f" of {len(self.cases)} cases"
        return (text + "".join(f"\n  skipped: {reason}" for reason in skipped)
                + "".join(f"\n  NOT EXERCISED (tested nothing): {line}" for line in unexercised))

    def raise_for_failures(self, *, allow_not_exercised: bool = False) -> ConformanceResult:
        """Raise ConformanceError with the table of failing cases, and the cases that tested
        nothing (unless ``allow_not_exercised``); return self otherwise."""
        __tracebackhide__ = True
        unexercised = self.with_status(Status.NOT_EXERCISED) and not allow_not_exercised
        if self.failures or unexercised:
            raise ConformanceError(f"{self.summary()}" + (f"\n{self.table()}" if self.failures else ""))
        return self

    def __str__(self) -> str:
        return self.summary() + (f"\n{self.table()}" if self.failures else "")


class ConformanceError(AssertionError):
    """A subject failed cases of the conformance matrix; the message is the table of failures."""
