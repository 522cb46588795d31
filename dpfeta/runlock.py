"""One process per run directory: ``<dir>/run.lock`` names its holder (host, pid, start time).

A second ``dpfeta run`` / ``dpfeta tune`` on the same directory is refused with the holder's name, so
two processes can never both spend budget under one ledger. Stale-lock rule: a lock whose holder is
on this host and no longer alive is taken over (logged); a lock held on another host is refused --
this host cannot tell whether that process lives; remove the file if you know it does not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _take(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}, f)
    return True


@contextlib.contextmanager
def hold(directory: Path | str):
    """Hold ``<directory>/run.lock`` for the block; refuse (ValueError naming the holder) if taken."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    if not _take(path):
        try:
            holder = json.loads(path.read_text())
        except (OSError, ValueError):
            holder = {}
        host, pid = holder.get("host"), holder.get("pid")
        if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
            log.warning("run lock %s: its holder (pid %s on %s) is gone; taking it over", path, pid, host)
            path.unlink(missing_ok=True)
        if not _take(path):
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
            raise ValueError(f"'{directory}' is in use by another dpfeta process (pid {pid} on host {host}, "
                             f"since {since}): two processes must never spend budget under one ledger. Wait "
                             f"for it, or, if you are sure it is gone, delete {path}")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
