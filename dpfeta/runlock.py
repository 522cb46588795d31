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


def _refusal(where: str, holder: dict) -> ValueError:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return ValueError(
        f"'{where}' is in use by another dpfeta process (pid {holder.get('pid')} on host "
        f"{holder.get('host')}, since {since}): two processes must never spend budget under one "
        f"ledger. Wait for it, or, if you are sure it is gone, delete {where}/{LOCK_FILE}"
    )


@contextlib.contextmanager
def _hold_object(store):
    """The lock as an object of an object store. The store has no create-if-absent here, so the lock
    is written, then read back after a pause: of two processes starting in the same instant, the one
    whose write landed last keeps it and the other is refused (S3 and GCS read-after-write are
    strongly consistent)."""
    import uuid

    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "token": uuid.uuid4().hex}
    if store.is_file(LOCK_FILE):
        holder = store.read_json(LOCK_FILE)
        if not (holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"])):
            raise _refusal(store.uri, holder)
        log.warning(
            "run lock %s: its holder (pid %s on %s) is gone; taking it over",
            store.url(LOCK_FILE),
            holder.get("pid"),
            holder.get("host"),
        )
    store.write_json(LOCK_FILE, me)
    time.sleep(RACE_PAUSE_S)
    holder = store.read_json(LOCK_FILE)
    if holder.get("token") != me["token"]:
        raise _refusal(store.uri, holder)
    try:
        yield store.url(LOCK_FILE)
    finally:
        try:
            if store.read_json(LOCK_FILE).get("token") == me["token"]:
                store.delete(LOCK_FILE)
        except (OSError, ValueError) as exc:
            log.warning(
                "run lock %s: could not remove it (%s); delete it before the next run", store.url(LOCK_FILE), exc
            )


RACE_PAUSE_S = 1.0


@contextlib.contextmanager
def hold(directory):
    """Hold ``<directory>/run.lock`` for the block; refuse (ValueError naming the holder) if taken.
    ``directory``: a local folder, or a ``storage.Storage`` (an object-store prefix)."""
    if hasattr(directory, "is_local"):
        if not directory.is_local:
            with _hold_object(directory) as where:
                yield where
            return
        directory = directory.local_path
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
            raise _refusal(str(directory), holder)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
