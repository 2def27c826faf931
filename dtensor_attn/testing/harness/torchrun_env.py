"""torchrun mode's inputs: what torchrun tells each worker, and the plugin's settings.

``launched_by_torchrun`` and ``TorchrunEnv.from_environ`` take the environment as an argument:
the plugin passes ``os.environ`` in; no other module of the harness reads it.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from pathlib import Path

import torch



class BackendChoice(str, enum.Enum):
    """``--dtensor-backend``: the process group's backend; AUTO picks one (``choose_backend``)."""

    AUTO = "auto"
    GLOO = "gloo"
    NCCL = "nccl"

    __str__ = str.__str__
    __format__ = str.__format__


class Unmarked(str, enum.Enum):
    """``--dtensor-unmarked``: what torchrun mode does with a test without a mesh marker."""

    SKIP = "skip"
    RUN = "run"

    __str__ = str.__str__
    __format__ = str.__format__


BACKENDS = tuple(choice.value for choice in BackendChoice)  # the options' choices
UNMARKED = tuple(choice.value for choice in Unmarked)


def launched_by_torchrun(environ: Mapping[str, str]) -> bool:
    return "TORCHELASTIC_RUN_ID" in environ and "RANK" in environ


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TorchrunEnv:
    """What torchrun tells each worker through its environment."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    run_id: str
    attempt: str

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> TorchrunEnv:
        needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        missing = [name for name in needed if name not in environ]
        if missing:
            raise ValueError(
                f"torchrun mode needs the environment variables {list(needed)}; missing "
                f"{missing}. Fix: launch with scripts/run_torchrun.sh or torchrun, or pass "
                "--dtensor-mode=simulate to run simulated ranks."
            )
        return cls(
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", environ["RANK"])),
            local_world_size=int(environ.get("LOCAL_WORLD_SIZE", environ["WORLD_SIZE"])),
            master_addr=environ["MASTER_ADDR"],
            master_port=int(environ["MASTER_PORT"]),
            run_id=environ.get("TORCHELASTIC_RUN_ID", "none"),
            attempt=environ.get("TORCHELASTIC_RESTART_COUNT", "0"),
        )


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class RunSettings:
    """``timeout_s`` bounds each test phase and each wait for the other ranks' outcome."""

    out_dir: Path
    timeout_s: float = 120.0
    backend: BackendChoice = BackendChoice.AUTO
    unmarked: Unmarked = Unmarked.SKIP

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"--dtensor-timeout must be > 0 seconds, got {self.timeout_s}.")
        if self.backend not in BACKENDS:
            raise ValueError(f"--dtensor-backend must be one of {BACKENDS}, got {self.backend!r}.")
        if self.unmarked not in UNMARKED:
            raise ValueError(
                f"--dtensor-unmarked must be one of {UNMARKED}, got {self.unmarked!r}."
            )
        object.__setattr__(self, "backend", BackendChoice(self.backend))  # options give strings
        object.__setattr__(self, "unmarked", Unmarked(self.unmarked))

    @property
    def wait_timeout_s(self) -> float:
        """Longer than a phase may run, so a hung rank's own report (at the timeout) arrives."""
        return self.timeout_s + max(2.0, self.timeout_s / 4)

    @property
    def grace_s(self) -> float:
        """How long a rank may stay in a phase that another rank failed before it is stuck."""
        return min(self.timeout_s / 3, 10.0)

    @property
    def silence_s(self) -> float:
        """How long a rank may send no heartbeat (its watchdog beats 4 times a second) before the
        others take it for gone: exited, killed, or holding the GIL in a call that never returns."""
        return max(self.grace_s, 2.0)

    @property
    def sync_timeout_s(self) -> float:
        """Session-level waits (start, collection, end), where ranks import and collect at their
        own pace, and the process group's own timeout: longer than a phase, so that a blocked
        collective is reported by the watchdog (with its stack) before gloo or NCCL time out."""
        return max(2 * self.timeout_s, 60.0)


def choose_backend(requested: BackendChoice | str, local_world_size: int) -> BackendChoice:
    """NCCL when every local rank has its own GPU (or when asked), else gloo."""
    requested = BackendChoice(requested)
    num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested is BackendChoice.NCCL and num_gpus < local_world_size:
        raise ValueError(
            f"--dtensor-backend=nccl needs one GPU per local rank: {local_world_size} ranks, "
            f"{num_gpus} GPUs. Fix: fewer ranks (-n), or --backend gloo."
        )
    if requested is not BackendChoice.AUTO:
        return requested
    return BackendChoice.NCCL if num_gpus >= local_world_size else BackendChoice.GLOO
