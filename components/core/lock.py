"""One run at a time per project, and the leftovers of dead runs cleaned when the next one starts.

The project lock is an ``flock`` on ``<artifacts>/.medexperts.lock``: the kernel drops it when its process dies
(even by kill -9), so a crash never leaves a stale lock. The holder writes who it is (pid, host, since) into the
file, so a second run can say whom it waits for. Re-entrant within one process (the flow and a stage it calls).

Temporary siblings (``.<name>.tmp-<pid>-<hex>``, ``.<name>.old-<pid>-<hex>``: ``components.core.layout.SIBLING``)
of processes that are gone are removed by ``clean_dead_temporaries``; an ``.old-`` backup whose output folder is
missing (a kill between the two renames of a swap) is put back instead, so no finished output is lost.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from components.core import stop
from components.core.errors import MedExpertsError
from components.core.layout import SIBLING

log = logging.getLogger("medexperts")
LOCK_FILE = ".medexperts.lock"
_held: dict[Path, tuple[Any, int]] = {}  # lock path -> (open file, depth): re-entrant within this process


class ProjectBusy(MedExpertsError):
    """Another run holds the project (and the caller asked not to wait)."""


def holder(path: Path) -> dict[str, Any]:
    """What the lock file says of its holder ({} when unreadable or empty)."""
    try:
        info = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def describe(info: dict[str, Any]) -> str:
    if not info:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    what = f" ({info['what']})" if info.get("what") else ""
    return f"pid {info.get('pid')} on {info.get('host')}{what}, since {since}"


@contextlib.contextmanager
def project_lock(folder: Path, *, wait: bool = True, what: str = "",
                 on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the project in ``folder`` for the duration. Held by another process: wait for it (``on_wait`` gets a
    line naming the holder, default: logged) or, with ``wait=False``, raise ``ProjectBusy`` naming it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = (folder / LOCK_FILE).resolve()
    if path in _held:
        fh, depth = _held[path]
        _held[path] = (fh, depth + 1)
        try:
            yield
        finally:
            fh, depth = _held[path]
            _held[path] = (fh, depth - 1)
        return
    fh = open(path, "a+")  # noqa: SIM115 -- held open for the lock's lifetime
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy = describe(holder(path))
            if not wait:
                raise ProjectBusy(f"the project {folder} is in use by another run ({busy}); wait for it to finish, "
                                  "or run without --no-wait to queue behind it") from None
            (on_wait or log.info)(f"waiting for the run that holds the project ({busy})")
            while True:  # polled, not a blocking flock: a stop request (SIGTERM) ends the wait at once
                stop.check("the wait for the project lock")
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(0.5)
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "what": what}))
        fh.flush()
        _held[path] = (fh, 1)
        try:
            yield
        finally:
            _held.pop(path, None)
            fh.seek(0)
            fh.truncate()
            fh.flush()
    finally:
        fh.close()  # closing drops the flock


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_dead_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary siblings of processes that are gone, under ``folder`` (recursively); restore an
    ``.old-`` backup whose output is missing. Call it while holding the project lock. Returns what it touched."""
    folder = Path(folder)
    touched: list[Path] = []
    if not folder.is_dir():
        return touched
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in [*dirnames, *filenames]:
            m = SIBLING.match(name)
            if m is None or int(m["pid"]) == os.getpid() or pid_alive(int(m["pid"])):
                continue
            path = Path(dirpath) / name
            target = path.with_name(m["name"])
            if m["kind"] == "old" and not target.exists():
                os.replace(path, target)
                log.warning("restored %s from the backup a killed run left (%s)", target, name)
            elif path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                log.info("removed %s, left by a run that is gone (pid %s)", path, m["pid"])
            else:
                path.unlink(missing_ok=True)
                log.info("removed %s, left by a run that is gone (pid %s)", path, m["pid"])
            touched.append(path)
        dirnames[:] = [d for d in dirnames if (Path(dirpath) / d).exists()]  # do not descend into what was removed
    return touched
