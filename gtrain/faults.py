"""Fault injection for gtrain's own tests; off unless GTRAIN_FAULT is set.

The promises "a kill -9 in the middle of a save leaves the previous checkpoint loadable"
and "a run interrupted at step N resumes bit-exact" are tested by making the real code
fail at exactly those moments:

    GTRAIN_FAULT=kill-during-save:last.pt  SIGKILL this process halfway through writing last.pt
    GTRAIN_FAULT=signal-at-step:N:SIGINT   send SIGINT to this process after optimizer step N
    GTRAIN_FAULT=kill-rank-at-step:R:N     SIGKILL the process of rank R after step N
"""

import os
import signal

_FAULT = os.environ.get("GTRAIN_FAULT", "")


def kill_during_save(name: str) -> bool:
    return _FAULT == f"kill-during-save:{name}"


def kill_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_signal_at_step(global_step: int) -> None:
    if _FAULT.startswith("signal-at-step:"):
        _, step, name = _FAULT.split(":")
        if global_step == int(step):
            os.kill(os.getpid(), getattr(signal, name))
    elif _FAULT.startswith("kill-rank-at-step:"):
        _, rank, step = _FAULT.split(":")
        if global_step == int(step) and os.environ.get("RANK") == rank:
            kill_now()
