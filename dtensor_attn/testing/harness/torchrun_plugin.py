"""torchrun mode as its own plugin object, registered by the harness plugin when torchrun
launched the run (the way pytest-xdist registers its session): every hook here wraps a test
phase or the session for the ranks' agreement, so the simulated mode carries none of it.

It is also the mode object the harness plugin asks for a test's skip reason, mesh and world
size (``SimulatedMode`` in simulate.py answers the same questions for simulated ranks).
"""

from __future__ import annotations

import os
import sys

import pytest

from dtensor_attn.testing.harness.meshspec import world_size_skip_reason
from dtensor_attn.testing.harness.outcome import CaseKind
from dtensor_attn.testing.harness.torchrun_env import Unmarked
from dtensor_attn.testing.harness.torchrun_session import TorchrunSession


class TorchrunPlugin:
    def __init__(self, run: TorchrunSession) -> None:
        self.run = run

    # -- the mode: what the harness plugin asks ---------------------------------------------
    def header(self) -> str:
        run = self.run
        return (f"dtensor_attn: torchrun rank {run.rank} of {run.world_size}, backend {run.group.backend}, "
                f"phase timeout {run.settings.timeout_s:g} s, logs and JUnit XML in "
                f"{run.settings.out_dir}")

    def skip_reason(self, axes: dict[str, int] | None) -> str | None:
        if axes is None:
            if self.run.settings.unmarked is Unmarked.RUN:
                return None
            return ("no mesh marker: runs in simulation (plain pytest); under torchrun only mesh "
                    "tests run (--dtensor-unmarked=run to run it on every rank)")
        return world_size_skip_reason(axes, self.run.world_size)

    def mesh(self, item: pytest.Item, axes: dict[str, int]):
        return self.run.mesh(axes)

    def close_test(self, item: pytest.Item) -> None:
        """Nothing per test: the process group lives for the session."""

    def world_size(self, item: pytest.Item) -> int:
        return self.run.world_size

    # -- hooks ------------------------------------------------------------------------------
    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.run.start()

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        """A file that fails to collect is an error in JUnit (pytest then stops before any
        test; without this the JUnit file would hold no case at all)."""
        if report.failed:
            self.run.collection_error(report.nodeid, report.longreprtext)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        difference = self.run.check_collection([item.nodeid for item in session.items])
        if difference is not None:
            self.run.stop_reason = difference
            pytest.exit(f"dtensor_attn: {difference}", returncode=pytest.ExitCode.INTERRUPTED)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item):
        return (yield from self._phase(item, "setup"))

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_call(self, item: pytest.Item):
        return (yield from self._phase(item, "call"))

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item, nextitem: pytest.Item | None):
        return (yield from self._phase(item, "teardown"))

    def _phase(self, item: pytest.Item, when: str):
        self.run.begin_phase(item.nodeid, when)
        try:
            return (yield)
        finally:
            self.run.end_phase()

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        report = yield
        self.run.agree(item, call, report)
        return report

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.run.pytest_session = session
        num_collected = len(getattr(session, "items", []))
        session.exitstatus = self.run.finish(num_collected, int(session.exitstatus))

    def pytest_terminal_summary(self, terminalreporter, config: pytest.Config) -> None:
        run = self.run
        if run.rank != 0:
            return
        terminalreporter.write_sep("=", f"dtensor_attn: {run.world_size} torchrun ranks, {run.group.backend}")
        terminalreporter.write_line(f"{'rank':<6}{'passed':>8}{'failed':>8}{'errors':>8}{'skipped':>9}")
        for rank, totals in sorted(run.rank_summaries.items()):
            if totals is None:
                terminalreporter.write_line(f"{rank:<6}  no summary: hung, stuck or killed (see "
                                            f"{run.settings.out_dir}/rank{rank}.log)")
                continue
            terminalreporter.write_line(
                f"{rank:<6}{totals.get(CaseKind.PASSED, 0):>8}{totals.get(CaseKind.FAILED, 0):>8}"
                f"{totals.get(CaseKind.ERROR, 0):>8}{totals.get(CaseKind.SKIPPED, 0):>9}"
            )
        for nodeid, when, verdict in run.failures:
            ranks = ", ".join(map(str, verdict.root_ranks))
            terminalreporter.write_line(f"root cause: rank {ranks} in {when} of {nodeid}")
        if run.stop_reason:
            terminalreporter.write_line(f"run stopped: {run.stop_reason}")
        if run.no_test_ran:
            terminalreporter.write_line(run.no_test_ran, red=True)
        terminalreporter.write_line(f"per-rank logs and JUnit XML: {run.settings.out_dir} (the "
                                    "run-level junit.xml follows from scripts/run_torchrun.sh)")

    @pytest.hookimpl(trylast=True)
    def pytest_unconfigure(self, config: pytest.Config) -> None:
        run = self.run
        run.close()
        # Every rank has written its results and passed the final store barrier. Exit now, all
        # within milliseconds: torchrun stops the other workers as soon as one exits non-zero,
        # and would otherwise SIGTERM (and then blame) a rank still in interpreter shutdown.
        session = run.pytest_session
        status = int(session.exitstatus) if session is not None else 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
