"""torchrun mode: one process group per session, and ranks that agree on every test's outcome.

After each phase (setup, call, teardown) of each test, every rank posts its outcome to the
launcher's TCPStore (a side channel that no collective can block) and waits, with a timeout,
for the others'; all ranks then apply the same ``agreement.judge`` verdict. A rank that hung or
got stuck is declared by its watchdog thread, which reports for it and ends the process once
the others have written their results; the others stop the run (the stuck rank may still hold a
collective that would pair with the next test's). Every store wait has a timeout.

Store keys (under ``dtensor_attn/<run id>/<attempt>/``): ``collect/<rank>`` test ids,
``phase/<n>/<rank>`` a RankReport, ``failed/<n>`` set by a rank that failed phase n (the
watchdogs of ranks still inside phase n read it), ``summary/<rank>``, ``done/<rank>``.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dtensor_attn import _compat
from dtensor_attn.testing.agreement import (
    FAILED, RankReport, Verdict, collection_difference, group_counts, judge,
)
from dtensor_attn.testing.junit import JUnitWriter, case_from_reports, junit_path
from dtensor_attn.testing.ranklog import RankLog, log_path
from dtensor_attn.testing.summary import ROOT_CAUSE_PROPERTY
from dtensor_attn.testing.torchrun_env import RunSettings, TorchrunEnv, choose_backend
from dtensor_attn.testing.watchdog import Phase, PhaseWatchdog


class TorchrunSession:
    """This rank's side of the run; created at pytest_configure, started at sessionstart."""

    def __init__(self, env: TorchrunEnv, settings: RunSettings) -> None:
        self.env = env
        self.settings = settings
        self.rank = env.rank
        self.world_size = env.world_size
        self.live_ranks = set(range(env.world_size))
        self.log = RankLog(log_path(settings.out_dir, env.rank), env.rank)
        self.junit = JUnitWriter(junit_path(settings.out_dir, env.rank), rank=env.rank,
                                 world_size=env.world_size)
        self.backend = ""
        self.device_type = "cpu"
        self.stop_reason = ""
        self.failures: list[tuple[str, str, Verdict]] = []
        self.rank_summaries: dict[int, dict | None] = {}
        self._meshes: dict[tuple[tuple[str, int], ...], DeviceMesh] = {}
        self._reports: dict[str, list] = {}
        self._phase_index = 0
        self._phase_ended_at = 0.0
        self._store: dist.Store | None = None
        self._watch_store: dist.Store | None = None
        self.watchdog: PhaseWatchdog | None = None
        self._owns_process_group = False
        self.pytest_session = None  # set at sessionfinish: its exit status ends the process
        self.console_fd: int | None = None  # this rank's console, outside pytest's capture

    # -- session ---------------------------------------------------------------------------
    def start(self) -> None:
        """Create the process group (once for the session), then the side channel."""
        started = time.monotonic()
        self.backend = choose_backend(self.settings.backend, self.env.local_world_size)
        pg_backend = "gloo"
        if self.backend == "nccl":
            torch.cuda.set_device(self.env.local_rank)
            self.device_type, pg_backend = "cuda", "cpu:gloo,cuda:nccl"
        timeout = datetime.timedelta(seconds=self.settings.sync_timeout_s)
        dist.init_process_group(pg_backend, timeout=timeout)
        self._owns_process_group = True
        self.open_side_channel()
        self.log.event(f"process group up in {time.monotonic() - started:.2f} s: backend "
                       f"{self.backend}, rank {self.rank} of {self.world_size}")

    def open_side_channel(self) -> None:
        """Two clients of the launcher's store (the test thread's, the watchdog's) and the
        watchdog. Needs no process group, so the agreement can be tested without one."""
        self._store, self._watch_store = self._open_store(), self._open_store()
        self.watchdog = PhaseWatchdog(
            timeout_s=self.settings.timeout_s, grace_s=self.settings.grace_s,
            log_file=self.log.file, peer_failed=self._peer_failed, declare=self._declared,
        )
        self.watchdog.start()

    def _open_store(self) -> dist.Store:
        store = dist.TCPStore(
            self.env.master_addr, self.env.master_port, is_master=False,
            timeout=datetime.timedelta(seconds=self.settings.sync_timeout_s),
            wait_for_workers=False,
        )
        return dist.PrefixStore(f"dtensor_attn/{self.env.run_id}/{self.env.attempt}/", store)

    def check_collection(self, nodeids: list[str]) -> str | None:
        """Why the ranks' test lists differ (None if they match); every rank returns the same."""
        self._post(f"collect/{self.rank}", json.dumps(nodeids))
        raw = self._gather("collect", self.live_ranks, self.settings.sync_timeout_s)
        missing = sorted(r for r, value in raw.items() if value is None)
        if missing:
            return (f"ranks {missing} did not finish collecting within "
                    f"{self.settings.sync_timeout_s:g} s (see their logs)")
        difference = collection_difference({r: json.loads(v) for r, v in raw.items()})
        self.log.event(f"collected {len(nodeids)} tests" + (f"; {difference}" if difference else
                                                            ", same list on every rank"))
        return difference

    def mesh(self, axes: Mapping[str, int]) -> DeviceMesh:
        """Cached per axes: every rank builds the same meshes in the same order (same tests)."""
        key = tuple(axes.items())
        if key not in self._meshes:
            self._meshes[key] = init_device_mesh(
                self.device_type, tuple(axes.values()), mesh_dim_names=tuple(axes)
            )
        return self._meshes[key]

    # -- phases ----------------------------------------------------------------------------
    def begin_phase(self, nodeid: str, when: str) -> None:
        self._phase_index += 1
        self.log.event(f"start {when} {nodeid}")
        self.watchdog.begin(self._phase_index, nodeid, when)

    def end_phase(self) -> None:
        self._phase_ended_at = time.time()
        if self.watchdog.end() is not None:
            # The watchdog thread has reported this rank hung or stuck and is ending the
            # process; this thread must not run another test out of step with the others.
            time.sleep(self.settings.sync_timeout_s + 5.0)
            os._exit(1)

    def agree(self, item, call, report) -> None:
        """Post this rank's outcome of the phase, wait for the others', apply the verdict."""
        n = self._phase_index
        text = report.longreprtext if report.failed else ""
        if report.skipped and isinstance(report.longrepr, tuple):
            text = report.longrepr[2]
        # After a stop, the counts stay out of step: report that once, not on every phase.
        counts = () if self.stop_reason else group_counts(_compat.collective_counts())
        mine = RankReport(rank=self.rank, outcome=report.outcome, at=self._phase_ended_at,
                          text=text, counts=counts)
        self._post(f"phase/{n}/{self.rank}", mine.to_json())
        if report.failed:
            self._post(f"failed/{n}", str(self.rank))
        raw = self._gather(f"phase/{n}", self.live_ranks, self.settings.wait_timeout_s)
        reports = {r: None if v is None else RankReport.from_json(v) for r, v in raw.items()}
        verdict = judge(item.nodeid, call.when, reports, timeout_s=self.settings.wait_timeout_s)
        self.live_ranks -= set(verdict.lost_ranks)
        if verdict.outcome == FAILED:
            self.failures.append((item.nodeid, call.when, verdict))
            self.log.event(f"{call.when} {item.nodeid} FAILED on every rank:\n{verdict.text}")
            report.outcome = "failed"
            report.longrepr = verdict.text
            if hasattr(report, "wasxfail"):
                del report.wasxfail
            root = ",".join(map(str, verdict.root_ranks))
            report.user_properties.append((ROOT_CAUSE_PROPERTY, root))
        if verdict.stop_reason and not self.stop_reason:
            self.stop_reason = verdict.stop_reason
            item.session.shouldfail = f"dtensor_attn {verdict.stop_reason}"
            self.log.event(verdict.stop_reason)
        self.record(report)

    def record(self, report) -> None:
        """Collect a test's agreed phase reports; write its JUnit case after its teardown."""
        self._reports.setdefault(report.nodeid, []).append(report)
        if report.when == "teardown":
            case = case_from_reports(self._reports.pop(report.nodeid))
            self.junit.add(report.nodeid, **case)
            note = f": {case['message']}" if case["message"] else ""
            self.log.event(f"{case['outcome']} {report.nodeid}{note}")

    # -- the end -----------------------------------------------------------------------------
    def finish(self, num_collected: int) -> None:
        """Write the final JUnit file; rank 0 gathers every live rank's totals for its summary."""
        self.junit.close(collected=num_collected, stop_reason=self.stop_reason)
        if self._store is None:
            return
        totals = dict(self.junit.counts, stop_reason=self.stop_reason)
        self._post(f"summary/{self.rank}", json.dumps(totals))
        if self.rank == 0:
            raw = self._gather("summary", self.live_ranks, self.settings.sync_timeout_s)
            self.rank_summaries = {r: None if v is None else json.loads(v) for r, v in raw.items()}
            self.rank_summaries.update({r: None for r in range(self.world_size) if r not in raw})

    def close(self) -> None:
        """Wait for the other live ranks to finish writing, then tear down (healthy runs only)."""
        if self.watchdog is not None:
            self.watchdog.stop()
        if self._store is not None:
            self._post(f"done/{self.rank}", "1")
            self._gather("done", self.live_ranks, self.settings.sync_timeout_s)
        healthy = not self.stop_reason and len(self.live_ranks) == self.world_size
        if healthy and self._owns_process_group:
            dist.destroy_process_group()
        self.log.event("session closed")
        self.log.close()

    def _post(self, key: str, value: str) -> None:
        try:
            self._store.set(key, value)
        except dist.DistError as error:
            self._lost_store(error)

    def _gather(
        self, prefix: str, ranks: set[int], timeout_s: float, store: dist.Store | None = None
    ) -> dict[int, bytes | None]:
        """{rank: value of <prefix>/<rank>} for ``ranks``, None for keys missing after the wait."""
        store = store or self._store
        keys = {r: f"{prefix}/{r}" for r in sorted(ranks)}
        if not keys:
            return {}
        try:
            try:
                store.wait(list(keys.values()), datetime.timedelta(seconds=timeout_s))
                present = keys
            except dist.DistStoreError:
                present = {r: key for r, key in keys.items() if store.check([key])}
            values = store.multi_get(list(present.values())) if present else []
        except dist.DistError as error:
            self._lost_store(error)
        got = dict(zip(present, values))
        return {r: got.get(r) for r in keys}

    def _lost_store(self, error: Exception) -> None:
        message = f"lost the launcher's store ({error}); the launcher is gone, ending this rank"
        self.log.event(message)
        print(f"dtensor_attn rank {self.rank}: {message}", file=sys.stderr, flush=True)
        self.junit.close(collected=-1, stop_reason=message, complete=False)
        os._exit(1)

    # -- watchdog side (runs on the watchdog thread) -------------------------------------------
    def _peer_failed(self, index: int) -> bool:
        return self._watch_store.check([f"failed/{index}"])

    def _declared(self, phase: Phase, outcome: str, text: str) -> None:
        """Report this rank hung or stuck, record the verdict, wait for the others, exit."""
        try:
            self._report_declared(phase, outcome, text)
        finally:
            self.log.event("ending this rank after its report (exit code 1)")
            os._exit(1)

    def _report_declared(self, phase: Phase, outcome: str, text: str) -> None:
        text = f"{text} (stacks in {self.log.path})"
        mine = RankReport(rank=self.rank, outcome=outcome, at=time.time(), text=text)
        store = self._watch_store
        store.set(f"phase/{phase.index}/{self.rank}", mine.to_json())
        store.set(f"done/{self.rank}", "1")
        # The others have reported already, or are being declared too: a short wait suffices
        # for this rank's files to carry the same verdict as theirs.
        wait_s = self.settings.grace_s + 2.0
        raw = self._gather(f"phase/{phase.index}", self.live_ranks - {self.rank}, wait_s, store)
        reports = {r: None if v is None else RankReport.from_json(v) for r, v in raw.items()}
        reports[self.rank] = mine
        verdict = judge(phase.nodeid, phase.when, reports, timeout_s=wait_s)
        self.log.event(f"{phase.when} {phase.nodeid} FAILED on every rank:\n{verdict.text}")
        if self.console_fd is not None:  # pytest is capturing this test's output: bypass it
            banner = f" dtensor_attn: {phase.nodeid} ({phase.when}), rank {self.rank} ends "
            os.write(self.console_fd, f"\n{banner:=^100}\n{verdict.text}\n".encode())
        self.junit.add(
            phase.nodeid, outcome="failed" if phase.when == "call" else "error",
            seconds=time.monotonic() - phase.started, message=verdict.text.splitlines()[0],
            text=verdict.text,
            properties={ROOT_CAUSE_PROPERTY: ",".join(map(str, verdict.root_ranks))},
        )
        self.junit.close(collected=-1, stop_reason=verdict.stop_reason or text, complete=False)
        others = self.live_ranks - {self.rank} - set(verdict.lost_ranks)
        self._gather("done", others, self.settings.sync_timeout_s, store)
