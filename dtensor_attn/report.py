"""The conformance matrix as a Markdown table and a self-contained HTML page.

``run_report(out_dir)`` runs ``check_attention`` on LocalMapAttention for every backend of the
registry and writes ``conformance.md`` and ``conformance.html``; ``write_report(results,
out_dir)`` writes the same from results already in hand. One row per subject variant, heads,
mask and LSE; one column per mesh (and one for the cached-state probe); each cell is one case:
pass, fail or skip, the output placements, and on failure what differed. Kernels that ran as
the math reference (no torch kernel for this device or for simulated ranks) are named
``[math]``; skipped cases are counted with their reasons. The HTML page has its style inline
and loads nothing.
"""

from __future__ import annotations

import dataclasses
import html
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from dtensor_attn.testing.kit.result import CaseOutcome, ConformanceResult, Status

MARKDOWN_NAME = "conformance.md"
HTML_NAME = "conformance.html"
_MARK = {Status.PASS: "pass", Status.FAIL: "FAIL", Status.SKIP: "skip", Status.NOT_EXERCISED: "NOT EXERCISED"}
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0 2em; font-size: 13px; }
th, td { border: 1px solid #bbb; padding: 4px 8px; vertical-align: top; }
th { background: #f0f0f0; text-align: left; }
td.pass { background: #e3f6e3; } td.fail { background: #fbdada; } td.skip { background: #f3f3f3; color: #666; }
td.none { background: #fff; }
code { font-size: 12px; } .why { display: block; font-size: 11px; color: #a00; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 12px; }
"""


@dataclasses.dataclass(frozen=True, slots=True)
class Report:
    markdown: Path
    html: Path
    counts: dict[str, int]  # cases passed, failed, skipped over all results

    @property
    def exit_code(self) -> int:
        """0 if no case failed or went unexercised (skips included: their reasons are in the report), else 1."""
        return 1 if self.counts.get("fail", 0) or self.counts.get("not_exercised", 0) else 0


def check_out_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir`` and prove it writable, before the matrix runs (tens of seconds), so a
    bad path fails at once. One-line ValueError naming the path, the reason and the fix."""
    out = Path(out_dir)
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    try:
        if blocker is not None:
            raise NotADirectoryError(f"{blocker} is a file, not a directory")
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-check-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        reason = str(error) if blocker is not None else (error.strerror or str(error))
        raise ValueError(
            f"--out {out}: cannot write the report there: {reason}. Fix: pass a directory you "
            "can create and write, e.g. --out ./conformance-report"
        ) from None
    return out


def run_report(out_dir: str | Path, **options) -> Report:
    """Run LocalMapAttention over the matrix for every registry backend, then write the report.

    ``options`` narrow the matrix as in ``check_attention`` (e.g. ``meshes=("tp2",)``)."""
    from dtensor_attn.local_map_attention import LocalMapAttention
    from dtensor_attn.testing.kit.check import check_attention

    result = check_attention(factory=lambda config: LocalMapAttention(config.build()), name="LocalMapAttention", **options)
    return write_report([result], out_dir)


def write_report(results: Sequence[ConformanceResult], out_dir: str | Path) -> Report:
    """Write conformance.md and conformance.html for ``results`` into ``out_dir`` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {str(s): sum(r.counts()[str(s)] for r in results) for s in Status}
    markdown, page = out / MARKDOWN_NAME, out / HTML_NAME
    markdown.write_text(_markdown(results, counts))
    page.write_text(_html(results, counts))
    return Report(markdown, page, counts)


# -- the grid: rows x meshes -------------------------------------------------------------------


def _row_key(case: CaseOutcome) -> tuple[str, ...]:
    lse = {None: "", True: "lse", False: "no lse"}[case.lse]
    kernel = case.kernel if case.kernel and case.kernel not in case.variant else ""
    return tuple(word for word in (case.variant, kernel, case.heads, case.mask, lse) if word)


def _grid(result: ConformanceResult):
    """(mesh columns, {row: {mesh: case}}) in the order the cases ran."""
    meshes = list(dict.fromkeys(c.mesh for c in result.cases))
    rows: dict[tuple[str, ...], dict[str, CaseOutcome]] = {}
    for case in result.cases:
        rows.setdefault(_row_key(case), {})[case.mesh] = case
    return meshes, rows


def _why(case: CaseOutcome) -> list[str]:
    if case.status is Status.SKIP:
        return [case.reason]
    return [f"{f.kind} of {f.what}: expected {f.expected}, actual {f.actual}" for f in case.failures]


def _kernels(results: Iterable[ConformanceResult]) -> list[str]:
    return sorted({c.kernel for r in results for c in r.cases if c.kernel})


def _skip_reasons(result: ConformanceResult) -> dict[str, int]:
    reasons: dict[str, int] = {}
    for case in result.with_status(Status.SKIP):
        reasons[case.reason] = reasons.get(case.reason, 0) + 1
    return reasons


def _intro(results, counts) -> list[str]:
    kernels = ", ".join(_kernels(results)) or "not reported by the subject"
    return [
        f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped.",
        f"Kernels: {kernels}. `[math]` is the math reference kernel with the backend's contract, run "
        "where torch has no kernel for this device or for simulated ranks.",
        "Each case runs on simulated ranks, forward and backward in float64, and compares every "
        "rank's full output, LSE and q/k/v gradients with the float64 reference, the global shape "
        "and the placements; a cell shows the output placements the subject returned.",
    ]


# -- Markdown ----------------------------------------------------------------------------------


def _md_cell(case: CaseOutcome | None) -> str:
    if case is None:
        return ""
    text = _MARK[case.status]
    if case.out_placements:
        text += f" `{case.out_placements}`"
    if case.status is Status.FAIL:
        text += ": " + "; ".join(_why(case))
    return text.replace("|", "\\|")


def _markdown(results, counts) -> str:
    lines = ["# dtensor_attn conformance", "", *(line + "  " for line in _intro(results, counts)), ""]
    for result in results:
        meshes, rows = _grid(result)
        lines += [f"## {result.subject}", "", result.summary().splitlines()[0], ""]
        lines.append("| case | " + " | ".join(meshes) + " |")
        lines.append("| --- " * (len(meshes) + 1) + "|")
        for key, by_mesh in rows.items():
            lines.append(f"| {' '.join(key)} | " + " | ".join(_md_cell(by_mesh.get(m)) for m in meshes) + " |")
        reasons = _skip_reasons(result)
        if reasons:
            lines += ["", "Skipped:", *(f"- {n} x {reason}" for reason, n in reasons.items())]
        if result.failures:
            lines += ["", "Failures:", "", "```", result.table().rstrip(), "```"]
        lines.append("")
    return "\n".join(lines)


# -- HTML --------------------------------------------------------------------------------------


def _html_cell(case: CaseOutcome | None) -> str:
    if case is None:
        return '<td class="none"></td>'
    why = "\n".join(_why(case))
    parts = [f"<b>{_MARK[case.status]}</b>"]
    if case.out_placements:
        parts.append(f"<code>{html.escape(case.out_placements)}</code>")
    if case.status is Status.FAIL:
        parts += [f'<span class="why">{html.escape(line)}</span>' for line in _why(case)]
    title = html.escape(f"{case.id}\n{why}".strip(), quote=True)
    return f'<td class="{case.status}" title="{title}">{" ".join(parts)}</td>'


def _html(results, counts) -> str:
    body = [f"<p>{html.escape(line).replace('`', '')}</p>" for line in _intro(results, counts)]
    for result in results:
        meshes, rows = _grid(result)
        body.append(f"<h2>{html.escape(result.subject)}</h2>")
        body.append(f"<p>{html.escape(result.summary().splitlines()[0])}</p>")
        header = "".join(f"<th>{html.escape(m)}</th>" for m in meshes)
        body.append(f"<table><tr><th>case</th>{header}</tr>")
        for key, by_mesh in rows.items():
            cells = "".join(_html_cell(by_mesh.get(m)) for m in meshes)
            body.append(f"<tr><th>{html.escape(' '.join(key))}</th>{cells}</tr>")
        body.append("</table>")
        reasons = _skip_reasons(result)
        if reasons:
            items = "".join(f"<li>{n} x {html.escape(reason)}</li>" for reason, n in reasons.items())
            body.append(f"<p>Skipped:</p><ul>{items}</ul>")
        if result.failures:
            body.append(f"<p>Failures:</p><pre>{html.escape(result.table())}</pre>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>dtensor_attn conformance</title><style>{_STYLE}</style></head>\n<body>"
        "<h1>dtensor_attn conformance</h1>\n" + "\n".join(body) + "\n</body></html>\n"
    )
