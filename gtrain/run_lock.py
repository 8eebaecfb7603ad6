"""One writer per run folder: a lock the kernel releases when its holder dies.

`gtrain fit` holds RUN/.lock (a POSIX record lock, `fcntl.lockf`) from before it writes
anything until it exits. A second `gtrain fit` that would train into the same folder (a
requeued job while the old one still runs, a --resume typed in another terminal) is
refused with one line naming the holder. A holder that is killed (kill -9, a lost node)
holds nothing: the kernel drops a process's record locks when it exits, so the next
start goes ahead. Record locks belong to the process, not to the file descriptor, so
DataLoader workers forked from it do not keep the lock alive after it.

`FileLock` is the same lock on any file: `gtrain tune` holds one on its study while it
picks the next trial, and one on each trial it runs.

On network filesystems: NFS (v3 with lockd, v4) and Lustre mounted with `-o flock`
forward these locks to the server, which releases them when the holder's lease ends
(NFSv4: about 90 s after a node is lost, so a restart on another node may be refused for
that long). A filesystem without locks (ENOLCK, EOPNOTSUPP) runs unlocked, with a warning.
"""

import errno
import fcntl
import json
import os
import socket
from datetime import datetime
from pathlib import Path

from gtrain.errors import UserError
from gtrain.run_folder import RunFolder

NO_LOCKS_HERE = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class FileLock:
    """An exclusive lock on one file, held by this process until `release` or its death;
    the holder's pid, host and start time are written into the file."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self.unlocked_because: str | None = None  # set when the filesystem has no locks

    def acquire(self, *, wait: bool = False) -> bool:
        """False when another live process holds it (without `wait`; with it, wait for it)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as error:
            os.close(fd)
            if error.errno in NO_LOCKS_HERE:
                self.unlocked_because = f"{self.path.parent} is on a filesystem without file locks ({error.strerror})"
                return True
            if error.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return True

    def release(self) -> None:
        # The file stays: deleting it would let a third process lock a new file while a
        # second still waits on the old one.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FileLock":
        self.acquire(wait=True)
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class RunLock(FileLock):
    """Held while a process trains into a run folder; `acquire` refuses a folder another
    live process holds."""

    def __init__(self, paths: RunFolder):
        super().__init__(paths.lock)
        self.paths = paths

    def acquire(self) -> "RunLock":
        try:
            self.paths.root.mkdir(parents=True, exist_ok=True)
            held = super().acquire()
        except OSError as error:
            raise UserError(f"cannot write {self.paths.lock}: {error.strerror}; choose a writable folder with --out") from None
        if not held:
            raise UserError(
                f"{self.paths.root} is being trained by {describe_holder(self.paths.lock)}: wait for it to end, "
                "stop it (a SIGTERM checkpoints and exits), or train into another --out"
            )
        return self

    def __enter__(self) -> "RunLock":
        return self.acquire()


def held_by_a_live_process(path: Path) -> bool | None:
    """Whether a live process holds the lock on `path` (None: there is no such file).
    Only for a file this process does not hold: closing it would release this process's own lock."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EAGAIN) or error.errno in NO_LOCKS_HERE:
            return True  # held; or no locks here, and then nothing can tell a dead holder
        raise
    finally:
        os.close(fd)


def describe_holder(path: Path) -> str:
    """"pid 123 on host-a since 2026-12-02T10:00:00+00:00", from what the holder wrote."""
    try:
        holder = json.loads(path.read_text())
        return f"pid {holder['pid']} on {holder['host']} since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
