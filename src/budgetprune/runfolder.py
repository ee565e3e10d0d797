"""Owning a run folder: one run at a time, in a usable folder, with no leftovers of a killed write.

``with RunFolder(out):`` is entered by every run — the command line's ``prune`` and ``demo``,
and :meth:`budgetprune.pipeline.PruneRun.run`, so the Python API too. On entry it

- checks that ``out`` can hold files (it is not a file, does not lie under one, is writable)
  and creates it;
- takes an exclusive lock on ``out/.lock``, which records the holder's pid and host; a second
  run in the folder is refused with one line (:class:`~budgetprune.errors.ConfigError`);
- removes the temporary files an interrupted atomic write left (``.model.pt.*.tmp``): while
  the lock is held nothing else writes there.

On exit the lock file is removed, and so is the folder when this entry created it and nothing
was written in it (a refused run leaves no trace).

The lock is ``fcntl.flock``: the OS releases it when its process ends, however it ends, so the
lock of a crashed run is stale by construction and the next run takes it. Where ``fcntl`` is
missing (Windows) the lock file is created with ``O_EXCL``, and one whose process no longer
runs on this host is taken over. Entering a folder again in the thread that holds it nests
(the command line holds it around ``PruneRun.run``, which enters it too); another thread is
refused like another process.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .io import folder_problem, remove_stale_temp_files

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = ".lock"


@dataclass
class _Holding:
    fd: int
    thread: int
    depth: int = 1


_held: dict[str, _Holding] = {}  # real path of a folder this process holds -> its lock
_held_guard = threading.Lock()


class RunFolder:
    """Context manager that owns the run folder ``path`` while a run writes into it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._key: str | None = None
        self._created: list[Path] = []

    def __enter__(self) -> "RunFolder":
        check_usable(self.path)
        self._created = _make_folder(self.path)
        try:
            self._key, first = _acquire(self.path)
            if first:
                remove_stale_temp_files(self.path)
        except BaseException:
            _remove_empty(self._created)
            raise
        return self

    def __exit__(self, *exc) -> None:
        _release(self._key)
        _remove_empty(self._created)


def check_usable(path: str | os.PathLike) -> None:
    """Raise a one-line :class:`ConfigError` when ``path`` cannot be a run folder."""
    problem = folder_problem(path)
    if problem:
        raise ConfigError(f"run folder {path} {problem}; choose another --out")


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the folders created, deepest first."""
    missing, p = [], folder
    while not p.exists() and p.parent != p:
        missing.append(p)
        p = p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"run folder {folder} cannot be created ({exc.strerror or exc}); "
                          "choose another --out") from None
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (the run wrote files): kept, and so are its parents


# -- the lock -------------------------------------------------------------------------------

def _acquire(folder: Path) -> tuple[str, bool]:
    """(key of the held folder, whether this call took the lock rather than nested)."""
    key = os.path.realpath(folder)
    with _held_guard:
        held = _held.get(key)
        if held is not None:
            if held.thread != threading.get_ident():
                raise _in_use(folder, {"pid": os.getpid(), "host": socket.gethostname()}, Path(key) / LOCK_NAME)
            held.depth += 1
            return key, False
        lock = Path(key) / LOCK_NAME
        fd = _lock_flock(lock, folder) if fcntl is not None else _lock_exclusive(lock, folder)
        _write_holder(fd)
        _held[key] = _Holding(fd, threading.get_ident())
    return key, True


def _release(key: str | None) -> None:
    if key is None:
        return
    with _held_guard:
        held = _held[key]
        held.depth -= 1
        if held.depth:
            return
        del _held[key]
    lock = Path(key) / LOCK_NAME
    if fcntl is not None:  # unlinked while still held: see _lock_flock
        _unlink(lock)
        os.close(held.fd)
    else:
        os.close(held.fd)
        _unlink(lock)


def _lock_flock(lock: Path, folder: Path) -> int:
    """An fd holding ``flock(LOCK_EX)`` on ``lock``.

    The holder removes the file on release, so a lock taken on a file that has meanwhile been
    removed or replaced is dropped and taken again on the file now at that path.
    """
    while True:
        fd = _open_lock(lock, folder, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise _in_use(folder, holder, lock) from None
            raise ConfigError(f"cannot lock run folder {folder} ({exc.strerror or exc}); "
                              "choose an --out on a local disk") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _lock_exclusive(lock: Path, folder: Path) -> int:
    """An fd of ``lock`` created with ``O_EXCL`` (no ``fcntl``); a dead holder's lock is taken over."""
    for _ in range(3):
        try:
            return _open_lock(lock, folder, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                holder = {}
            if not _stale(holder):
                raise _in_use(folder, holder, lock) from None
            _unlink(lock)
    raise _in_use(folder, {}, lock)


def _open_lock(lock: Path, folder: Path, flags: int) -> int:
    try:
        return os.open(lock, flags, 0o666)
    except FileExistsError:
        raise
    except OSError as exc:
        raise ConfigError(f"cannot open the lock file {lock} of run folder {folder} ({exc.strerror or exc}); "
                          "choose another --out") from None


def _write_holder(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n").encode())


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 4096) or b"{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _stale(holder: dict) -> bool:
    """Whether a lock file's holder is a process of this host that no longer runs."""
    pid = holder.get("pid")
    return isinstance(pid, int) and holder.get("host") == socket.gethostname() and not _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":
        import ctypes
        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return kernel32.GetLastError() == 5  # access denied: it exists
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _in_use(folder: Path, holder: dict, lock: Path) -> ConfigError:
    pid, host = holder.get("pid"), holder.get("host")
    who = f"pid {pid} on {host}" if pid and host else f"see {lock}"
    if pid == os.getpid() and host == socket.gethostname():
        who = "another thread of this process"
    return ConfigError(f"run folder {folder} is in use by another run ({who}); wait for it to end or "
                       "choose another --out")


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
