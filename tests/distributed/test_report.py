"""The conformance report end to end: run_report over the registry, and a real failing subject.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

The kit builds its own simulated meshes, so these tests carry no mesh marker. The matrix is
narrowed to one mesh to stay fast; test_conformance.py runs the whole of it.
"""

from __future__ import annotations

import pytest

from dtensor_attn._compat import packed_strided_shard_usable

import attention_subjects as subjects
from dtensor_attn import Layout, LocalMapAttention
from dtensor_attn.backends import REGISTRY
from dtensor_attn.config import Backend
from dtensor_attn.report import run_report, write_report
from dtensor_attn.testing.kit.check import check_attention

ONE_CASE = dict(meshes=("cp2",), gqa=(True,), masks=("causal",), lse=(False,), cache_check=False)


@pytest.mark.skipif(
    not packed_strided_shard_usable(),
    reason="this torch cannot full_tensor() a _StridedShard (torch 2.11): the packed output under CP pinned here is refused there",
)
def test_run_report_covers_every_registry_backend(tmp_path):
    report = run_report(tmp_path, **ONE_CASE)
    assert report.exit_code == 0 and report.counts["fail"] == 0
    markdown = report.markdown.read_text()
    kernels = next(line for line in markdown.splitlines() if line.startswith("Kernels: "))
    for backend in REGISTRY:
        assert f"| {backend}-BLNH" in markdown and str(backend) in kernels, backend
    varlen = Backend.VARLEN
    assert f"| {varlen}-TNH {varlen}[math] gqa causal no lse | pass `(_S(0, 2))` |" in markdown  # no varlen kernel on CPU
    assert "<td class=\"pass\"" in report.html.read_text()


@pytest.mark.skipif(
    not packed_strided_shard_usable(),
    reason="this torch cannot full_tensor() a _StridedShard (torch 2.11): the packed output under CP pinned here is refused there",
)
def test_a_real_failure_and_a_pass_side_by_side(tmp_path):
    good = check_attention(factory=lambda config: LocalMapAttention(config.build()), name="LocalMapAttention",
                           backends=[Backend.VARLEN], outputs=[Layout.TNH], **ONE_CASE)
    bad = check_attention(factory=subjects.FlattenWithoutStride, backends=[Backend.VARLEN], outputs=[Layout.TNH], **ONE_CASE)
    report = write_report([good, bad], tmp_path)
    assert report.exit_code == 1 and report.counts == {"pass": 1, "fail": 1, "skip": 0, "not_exercised": 0}
    markdown = report.markdown.read_text()
    assert "## LocalMapAttention" in markdown and "## FlattenWithoutStride" in markdown
    assert "FAIL `(S(0))`: placements of output: expected (_S(0, 2)), actual (S(0))" in markdown
    page = report.html.read_text()
    assert page.count('<td class="fail"') == 1 and page.count('<td class="pass"') == 1
