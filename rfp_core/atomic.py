"""Write-temp-then-rename, so a crash never leaves a half-written checkpoint or manifest.

Temp files are named `.<final name>.~<host>-<pid>~<random>.tmp`: a process killed mid-write
(SIGKILL, power loss) leaves one behind, and `sweep_temps` removes those whose writer is gone
(same host, pid no longer alive) without touching a live writer's file. `file_lock` serialises
read-merge-write updates of files several processes share (caches).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Callable, Iterator

_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
_TEMP_RE = re.compile(r"^\..*\.~(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)~[^.]*\.tmp$")


def temp_prefix(final_name: str) -> str:
    """mkstemp prefix for a temp file beside `final_name` that says who writes it."""
    return f".{final_name}.~{_HOST}-{os.getpid()}~"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_temps(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Delete temp files under `folder` left by writers of this host that no longer run; returns them.

    Temp files of live processes (another ingest writing the shared store) and of other hosts
    (a store on a network disk) are kept: only their writer knows whether they are finished."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    walker = os.walk(folder) if recursive else [(str(folder), [], os.listdir(folder))]
    for root, _, files in walker:
        for name in files:
            m = _TEMP_RE.match(name)
            if m and m["host"] == _HOST and not _alive(int(m["pid"])):
                path = Path(root) / name
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return removed


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive advisory lock on `<path>.lock` (the lock file is kept: deleting it would race)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success fsync it and rename it over `final`.

    The temp file lives in the same directory so `os.replace` is atomic on POSIX.
    On any exception the temp file is removed and `final` is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(final.name), suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(final: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)
    return Path(final)


def atomic_write_text(final: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(final, text.encode("utf-8"))


def atomic_write_with(final: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Call `writer(tmp_path)` (e.g. `lambda p: torch.save(obj, p)`) and publish atomically."""
    with atomic_path(final) as tmp:
        writer(tmp)
    return Path(final)
