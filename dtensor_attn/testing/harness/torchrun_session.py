"""torchrun mode's session: ranks that agree on every test's outcome, and its files.

After each phase (setup, call, teardown) of each test, every rank posts its outcome to the
launcher's TCPStore (``sidechannel.py``: a side channel that no collective can block) and
waits, with a timeout, for the others'; all ranks then apply the same ``agreement.judge``
verdict. A rank that hung or got stuck is declared by its watchdog thread, which reports for it
and ends the process once the others have written their results; a rank that went silent (no
heartbeat: it exited, was killed, or holds the GIL) is reported for by the others, who stop
waiting for it. Either way the others stop the run (such a rank may still hold a collective
that would pair with the next test's). Every store wait has a timeout. The process group, one
per session, and its meshes are ``torchrun_group.py``'s.

Files: ``rank<r>.collected.txt`` (the collected test ids, one a line, before the first test),
``rank<r>.xml`` (``junit.py``) and ``rank<r>.log`` (``ranklog.py``), read by the launcher.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import time
from collections.abc import Mapping

from torch.distributed.device_mesh import DeviceMesh

from dtensor_attn import _compat
from dtensor_attn.testing.harness.agreement import (
    RankReport, Verdict, collection_difference, group_counts, judge,
)
from dtensor_attn.testing.harness.junit import HARNESS, JUnitWriter, case_from_reports, junit_path
from dtensor_attn.testing.harness.outcome import CaseKind, Outcome
from dtensor_attn.testing.harness.ranklog import RankLog, log_path
from dtensor_attn.testing.harness.sidechannel import (
    Heartbeats, OwnBeat, SideChannel, read_divergence, read_phase_reports, report_silent_peers,
)
from dtensor_attn.testing.harness.summary import ROOT_CAUSE_PROPERTY, collected_path, no_test_ran
from dtensor_attn.testing.harness.torchrun_env import RunSettings, TorchrunEnv
from dtensor_attn.testing.harness.torchrun_group import SessionGroup
from dtensor_attn.testing.harness.watchdog import PeerEvent, Phase, PhaseWatchdog


def _raise(error: Exception) -> None:
    raise error  # the watchdog thread turns a lost store into this rank's failure


class TorchrunSession:
    """This rank's side of the run; created at pytest_configure, started at sessionstart."""

    def __init__(self, env: TorchrunEnv, settings: RunSettings) -> None:
        self.env = env
        self.settings = settings
        self.rank = env.rank
        self.world_size = env.world_size
        self.live_ranks = frozenset(range(env.world_size))  # replaced, never mutated (threads)
        self.log = RankLog(log_path(settings.out_dir, env.rank), env.rank)
        self.junit = JUnitWriter(junit_path(settings.out_dir, env.rank), rank=env.rank,
                                 world_size=env.world_size)
        self.group = SessionGroup(env, settings)  # the process group and its meshes
        self.stop_reason = ""
        self.no_test_ran = ""  # why the run tested nothing, where it did
        self.failures: list[tuple[str, str, Verdict]] = []
        self.rank_summaries: dict[int, dict | None] = {}
        self.heartbeats = Heartbeats()
        self._silent: set[tuple[int, int]] = set()  # (rank, phase) reported silent by this rank
        # (index, test id, setup/call/teardown) of the latest phase: one value, as the watchdog
        # thread reads it
        self._phase = (0, "", "")
        self._reports: dict[str, list] = {}
        self._phase_ended_at = 0.0
        self._own_beat = OwnBeat(env.rank, settings.silence_s)
        self._chan: SideChannel | None = None  # the test thread's client
        self._watch: SideChannel | None = None  # the watchdog thread's client
        self.watchdog: PhaseWatchdog | None = None
        self._dumps_on_sigterm = False
        self.pytest_session = None  # set at sessionfinish: its exit status ends the process
        self.console_fd: int | None = None  # this rank's console, outside pytest's capture

    # -- session ---------------------------------------------------------------------------
    def start(self) -> None:
        """Create the process group (once for the session), then the side channel."""
        started = time.monotonic()
        # torchrun stops the other ranks with SIGTERM once one fails: each leaves its stacks in
        # its log, also a rank whose watchdog cannot run (a call holding the GIL).
        faulthandler.register(signal.SIGTERM, file=self.log.file, all_threads=True, chain=True)
        self._dumps_on_sigterm = True
        self.group.start()
        self.open_side_channel()
        self.log.event(f"process group up in {time.monotonic() - started:.2f} s: backend "
                       f"{self.group.backend}, rank {self.rank} of {self.world_size}")

    def open_side_channel(self) -> None:
        """Two clients of the launcher's store (the test thread's, the watchdog's), the first
        heartbeat and the watchdog. Needs no process group: the agreement is tested without."""
        prefix = f"dtensor_attn/{self.env.run_id}/{self.env.attempt}/"
        host, port = self.env.master_addr, self.env.master_port
        wait_s = self.settings.sync_timeout_s
        self._chan = SideChannel.connect(host, port, prefix, wait_s, self._lost_store)
        self._watch = SideChannel.connect(host, port, prefix, wait_s, _raise)
        self._beat(self._chan)
        self.watchdog = PhaseWatchdog(
            timeout_s=self.settings.timeout_s, grace_s=self.settings.grace_s,
            log_file=self.log.file, peer_event=self._peer_event, declare=self._declared,
            heartbeat=self._heartbeat,
        )
        self.watchdog.start()

    def check_collection(self, nodeids: list[str]) -> str | None:
        """Why the ranks' test lists differ (None if they match); every rank returns the same.
        A difference is recorded as a failure in this rank's JUnit file."""
        path = collected_path(self.settings.out_dir, self.rank)
        path.write_text("".join(f"{nodeid}\n" for nodeid in nodeids))
        self.junit.expect(nodeids)
        self._chan.post(f"collect/{self.rank}", json.dumps(nodeids))
        raw = self._chan.gather("collect", self.live_ranks, self.settings.sync_timeout_s)
        missing = sorted(r for r, value in raw.items() if value is None)
        if missing:
            difference = (f"ranks {missing} did not finish collecting within "
                          f"{self.settings.sync_timeout_s:g} s (see their logs)")
        else:
            difference = collection_difference({r: json.loads(v) for r, v in raw.items()})
        self.log.event(f"collected {len(nodeids)} tests" + (f"; {difference}" if difference else
                                                            ", same list on every rank"))
        if difference:
            self.junit.add(f"{HARNESS}collection", outcome=CaseKind.FAILED, seconds=0.0,
                           message=difference.splitlines()[0], text=difference)
        return difference

    def collection_error(self, nodeid: str, text: str) -> None:
        """A file or class that failed to collect: an error in JUnit (pytest then stops)."""
        self.junit.add(f"{HARNESS}collection_error[{nodeid}]", outcome=CaseKind.ERROR, seconds=0.0,
                       message=f"collection error in {nodeid}", text=text)

    def mesh(self, axes: Mapping[str, int]) -> DeviceMesh:
        return self.group.mesh(axes)

    # -- phases ----------------------------------------------------------------------------
    def begin_phase(self, nodeid: str, when: str) -> None:
        self._phase = (self._phase[0] + 1, nodeid, when)
        if when == "setup":
            self.junit.begin_test(nodeid)
        self.log.event(f"start {when} {nodeid}")
        self._beat(self._chan)  # announces the phase: a rank that vanishes now is placed in it
        self.watchdog.begin(self._phase[0], nodeid, when)

    def end_phase(self) -> None:
        self._phase_ended_at = time.time()
        if self.watchdog.end() is not None:
            # The watchdog thread has reported this rank hung or stuck and is ending the
            # process; this thread must not run another test out of step with the others.
            time.sleep(self.settings.sync_timeout_s + 5.0)
            os._exit(1)

    def agree(self, item, call, report) -> None:
        """Post this rank's outcome of the phase, wait for the others', apply the verdict."""
        n = self._phase[0]
        text = report.longreprtext if report.failed else ""
        if report.skipped and isinstance(report.longrepr, tuple):
            text = report.longrepr[2]
        # After a stop, the counts stay out of step: report that once, not on every phase.
        counts = () if self.stop_reason else group_counts(_compat.collective_counts())
        mine = RankReport(rank=self.rank, outcome=Outcome(report.outcome), at=self._phase_ended_at,
                          text=text, counts=counts)
        self._own_beat.post_report(self._chan, n, mine.to_json())
        if report.failed or report.skipped:  # ranks still inside the phase may wait for this one
            self._chan.post(f"diverged/{n}", f"{report.outcome} {self.rank}")
        reports = read_phase_reports(self._chan, n, self.live_ranks, self.settings.wait_timeout_s)
        verdict = judge(item.nodeid, call.when, reports, timeout_s=self.settings.wait_timeout_s)
        self.live_ranks = self.live_ranks - set(verdict.lost_ranks)
        if verdict.outcome is Outcome.FAILED:
            self.failures.append((item.nodeid, call.when, verdict))
            self.log.event(f"{call.when} {item.nodeid} FAILED on every rank:\n{verdict.text}")
            report.outcome = Outcome.FAILED.value  # pytest's own report: a plain string
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
    def finish(self, num_collected: int, exitstatus: int) -> int:
        """Write the final JUnit file; rank 0 gathers every live rank's totals for its summary.
        Returns the exit status: 5, as pytest's when nothing ran, if every test skipped."""
        if exitstatus in (0, 5) and self.junit.num_ran == 0 and not self.stop_reason:
            self.no_test_ran = no_test_ran(num_collected, self.junit.skip_reasons)
            self.log.event(self.no_test_ran)
            self.junit.add(f"{HARNESS}no_test_ran", outcome=CaseKind.FAILED, seconds=0.0,
                           message=self.no_test_ran.splitlines()[0], text=self.no_test_ran)
            exitstatus = 5
        self.junit.close(collected=num_collected, stop_reason=self.stop_reason)
        if self._chan is None:
            return exitstatus
        totals = dict(self.junit.counts, stop_reason=self.stop_reason)
        self._chan.post(f"summary/{self.rank}", json.dumps(totals))
        if self.rank == 0:
            raw = self._chan.gather("summary", self.live_ranks, self.settings.sync_timeout_s)
            self.rank_summaries = {r: None if v is None else json.loads(v) for r, v in raw.items()}
            self.rank_summaries.update({r: None for r in range(self.world_size) if r not in raw})
        return exitstatus

    def close(self) -> None:
        """Wait for the other live ranks to finish writing, then tear down (healthy runs only)."""
        if self.watchdog is not None:
            self.watchdog.stop()
        if self._chan is not None:
            self._chan.post(f"done/{self.rank}", "1")
            self._chan.gather("done", self.live_ranks, self.settings.sync_timeout_s)
        self.group.close(healthy=not self.stop_reason and len(self.live_ranks) == self.world_size)
        if self._dumps_on_sigterm:
            faulthandler.unregister(signal.SIGTERM)
        self.log.event("session closed")
        self.log.close()

    def _lost_store(self, error: Exception) -> None:
        message = f"lost the launcher's store ({error}); the launcher is gone, ending this rank"
        self.log.event(message)
        print(f"dtensor_attn rank {self.rank}: {message}", file=sys.stderr, flush=True)
        self.junit.close(collected=-1, stop_reason=message, complete=False)
        os._exit(1)

    # -- heartbeats (the test thread at each phase start, the watchdog thread between) ----------
    def _beat(self, chan: SideChannel) -> None:
        self._own_beat.beat(chan, self._phase[0])

    def _heartbeat(self) -> None:
        """Beat, read the others' beats, and report for those that went silent in this phase."""
        self._beat(self._watch)
        peers = self.live_ranks - {self.rank}
        self._watch.observe_beats(peers, self.heartbeats)
        for rank in report_silent_peers(self._watch, self.heartbeats, peers, self._phase,
                                        self.settings.silence_s, self._silent):
            self.log.event(f"rank {rank} went silent in phase {self._phase[0]}: reported for it")

    # -- watchdog side (runs on the watchdog thread) -------------------------------------------
    def _peer_event(self, index: int) -> PeerEvent | None:
        """Another rank failed, skipped or went silent in phase ``index``, as the store says."""
        divergence = read_divergence(self._watch, index)
        if divergence is None or divergence[1] == self.rank:
            return None
        return PeerEvent(*divergence)

    def _declared(self, phase: Phase, outcome: Outcome, text: str) -> None:
        """Report this rank hung or stuck, record the verdict, wait for the others, exit."""
        try:
            self._report_declared(phase, outcome, text)
        finally:
            self.log.event("ending this rank after its report (exit code 1)")
            os._exit(1)

    def _report_declared(self, phase: Phase, outcome: Outcome, text: str) -> None:
        text = f"{text} (stacks in {self.log.path})"
        counts = group_counts(_compat.collective_counts())  # the collective it waits in counts
        mine = RankReport(rank=self.rank, outcome=outcome, at=time.time(), text=text,
                          counts=counts)
        chan = self._watch
        mine = RankReport.from_json(self._own_beat.post_report(chan, phase.index, mine.to_json()))
        chan.post(f"done/{self.rank}", "1")
        # The others have reported already, are being declared too, or went silent (reported
        # for): a short wait suffices for this rank's files to carry the same verdict as theirs.
        wait_s = self.settings.grace_s + 2.0
        reports = read_phase_reports(chan, phase.index, self.live_ranks - {self.rank}, wait_s)
        reports[self.rank] = mine
        verdict = judge(phase.nodeid, phase.when, reports, timeout_s=wait_s)
        self.log.event(f"{phase.when} {phase.nodeid} FAILED on every rank:\n{verdict.text}")
        if self.console_fd is not None:  # pytest is capturing this test's output: bypass it
            banner = f" dtensor_attn: {phase.nodeid} ({phase.when}), rank {self.rank} ends "
            os.write(self.console_fd, f"\n{banner:=^100}\n{verdict.text}\n".encode())
        self.junit.add(
            phase.nodeid, outcome=CaseKind.of_failed_phase(phase.when),
            seconds=time.monotonic() - phase.started, message=verdict.text.splitlines()[0],
            text=verdict.text,
            properties={ROOT_CAUSE_PROPERTY: ",".join(map(str, verdict.root_ranks))},
        )
        self.junit.close(collected=-1, stop_reason=verdict.stop_reason or text, complete=False)
        others = self.live_ranks - {self.rank} - set(verdict.lost_ranks)
        chan.gather("done", others, self.settings.sync_timeout_s)
