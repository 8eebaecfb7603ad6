"""Fault injection for gtrain's own tests; off unless GTRAIN_FAULT is set.

The promises "a kill -9 in the middle of a save leaves the previous checkpoint loadable"
and "a run interrupted at step N resumes bit-exact" are tested by making the real code
fail at exactly those moments:

    GTRAIN_FAULT=kill-during-save:last.pt  SIGKILL this process halfway through writing last.pt
    GTRAIN_FAULT=signal-at-step:N:SIGINT   send SIGINT to this process after optimizer step N
    GTRAIN_FAULT=kill-rank-at-step:R:N     SIGKILL the process of rank R after step N
    GTRAIN_FAULT=kill-at-step:N            SIGKILL every process after step N

The kills strike only a job's first start: the job that torchrun or SLURM restarts after
them trains on.
"""

import os
import signal
from collections.abc import Callable

_FAULT = os.environ.get("GTRAIN_FAULT", "")


def kill_during_save(name: str) -> bool:
    return _FAULT == f"kill-during-save:{name}"


def kill_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_signal_at_step(global_step: int, wait_for_files: Callable[[], None]) -> None:
    """The step's fault, if any. A kill comes once the files asked for are written (in the
    background): the tests then know which checkpoint it leaves. A kill in the middle of a
    write is kill-during-save's."""
    if not _FAULT:
        return
    from gtrain.distributed import World, restart_count

    kind, *args = _FAULT.split(":")
    if kind == "signal-at-step" and global_step == int(args[0]):
        os.kill(os.getpid(), getattr(signal, args[1]))
    first_start = restart_count() == 0
    if kind == "kill-rank-at-step" and global_step == int(args[1]) and World.from_env().rank == int(args[0]) and first_start:
        wait_for_files()
        kill_now()
    if kind == "kill-at-step" and global_step == int(args[0]) and first_start:
        wait_for_files()
        kill_now()
