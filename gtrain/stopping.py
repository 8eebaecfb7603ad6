"""Stopping a run on a signal: finish the step, checkpoint, exit with a code that says
whether the same command continues it."""

import signal

# The exit code of a run that stopped with a checkpoint to continue from, for a reason that
# is not the user's (preemption, a lost process): sysexits' EX_TEMPFAIL, "try again". The
# same command with --auto-resume, or --resume DIR, continues it.
RESUMABLE_EXIT_CODE = 75


class StopRequest:
    """First SIGINT, SIGTERM or SIGUSR1 (what schedulers send before they preempt a job):
    finish the current step, checkpoint, exit. Second SIGINT: stop at once (the checkpoint
    on disk is still the previous, intact one)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __bool__(self) -> bool:
        return self.signum is not None


class Interrupted(Exception):
    """The run stopped, checkpointed, on a signal: to this process (`signum`), or to another
    process of the job (None), which schedulers send as SIGTERM."""

    def __init__(self, signum: int | None):
        signum = signum or signal.SIGTERM
        # Ctrl-C keeps the shell's 130; a scheduler's signal says "resumable".
        self.exit_code = 130 if signum == signal.SIGINT else RESUMABLE_EXIT_CODE
        super().__init__(signal.Signals(signum).name)
