"""Files written whole or not at all, and the memory a file may take: plain Python, no torch,
for every module that writes a run's files (checkpoints, weights, run.json, plots, exports).

Every write goes to a temporary file in the same folder, is fsynced, then renamed over the
old file, so a crash at any moment leaves the previous file intact.
"""

import os
import stat
import tempfile
from pathlib import Path

from gtrain import faults
from gtrain.errors import UserError, printable


def write_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror}; choose a writable folder with --out") from None
    try:
        # mkstemp creates the file private (0600); give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, (stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH) & ~umask)
        with os.fdopen(fd, "wb") as file:
            if faults.kill_during_save(path.name):
                file.write(data[: len(data) // 2])
                file.flush()
                faults.kill_now()
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {error.strerror}; the previous file is unchanged") from None


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, text.encode())


# ---------------------------------------------------------------------------------------
# Memory


def check_fits_in_memory(nbytes: int, source: Path) -> None:
    """Refuse, before reading, a file whose tensors would not fit in the memory left."""
    available = available_memory()
    if available is not None and nbytes > available:
        raise UserError(
            f"{printable(source)}: its tensors need {nbytes / 2**30:,.1f} GiB and {available / 2**30:,.1f} GiB of "
            "memory is available: free memory, or check that this is the file you meant"
        )


def available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
