"""The lease that lets one run at a time write an output: ``_lease.json``, created exclusively (``If-None-Match: *``
on S3, a whole file hard-linked into place locally), renewed while the run lives, deleted at the end. A second run is
refused at once with the holder's name; a lease whose holder died (its process gone on this host, or no renewal for
``STALE_S``) is taken over, and the takeover is logged. Its body carries the run's token, so a write of its own whose
answer was lost (and whose retry was refused) is known as its own.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from kemo import storage
from kemo.storage import json_bytes

log = logging.getLogger(__name__)
RENEW_S = float(os.environ.get("KEMO_LEASE_RENEW_S", 30))
STALE_S = float(os.environ.get("KEMO_LEASE_STALE_S", 300))  # ten missed renewals: a holder that is gone


class OutputBusy(RuntimeError):
    """Another run holds the output's lease."""


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """An exclusive, renewed claim on one output, held by one run (a uuid, this host and process)."""

    def __init__(self, uri: str, renew_s: float = RENEW_S, stale_s: float = STALE_S):
        self.uri, self.renew_s, self.stale_s = uri, renew_s, stale_s
        now = time.time()
        self.body = {"run": uuid.uuid4().hex[:12], "host": socket.gethostname(), "pid": os.getpid(),
                     "started_at": utc_now(), "renewed_at": utc_now(), "renewed_unix": now}
        self.version: str | None = None  # of our lease file (an S3 ETag): renewals and the release are conditional
        self.renewed = now  # when a renewal last succeeded
        self.lost: str | None = None
        self._lock = threading.Lock()  # the renewal thread and check() both swap version
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def describe(self, body: dict[str, Any]) -> str:
        age = time.time() - float(body.get("renewed_unix", 0))
        return (f"run {body.get('run')} (pid {body.get('pid')} on {body.get('host')}, started {body.get('started_at')},"
                f" renewed {age:.0f} s ago)")

    def _stale(self, body: dict[str, Any]) -> str | None:
        """Why the holder is gone, or None while it lives."""
        if not body:
            return "its lease file is unreadable"  # creates are atomic: never a live lease half-written
        if body.get("host") == socket.gethostname() and not _pid_alive(int(body.get("pid", -1))):
            return "its process is gone"
        if time.time() - float(body.get("renewed_unix", 0)) > self.stale_s:
            return f"no renewal for over {self.stale_s:.0f} s"
        return None

    def acquire(self) -> None:
        for _ in range(5):  # the holder may release between our create and our read
            created, self.version = storage.create_exclusive(self.uri, json_bytes(self.body))
            if created:
                break
            try:
                data, version = storage.read_with_version(self.uri)
            except FileNotFoundError:
                continue
            try:
                holder = json.loads(data)
            except ValueError:
                holder = {}
            if holder == self.body:  # our own create, applied, whose answer was lost: the retry saw it (412)
                self.version = version
                break
            why = self._stale(holder)
            if why is None:
                raise OutputBusy(f"{os.path.dirname(self.uri)} is being written by {self.describe(holder)}: "
                                 "wait for it to finish, or choose another output")
            replaced, self.version = storage.replace_if_version(self.uri, json_bytes(self.body), version)
            if replaced:
                log.warning("took over the lease of %s: %s", self.describe(holder), why)
                break
        else:
            raise OutputBusy(f"could not take the lease {self.uri}: other runs keep taking it")
        self.renewed = time.time()
        self._thread = threading.Thread(target=self._renew, name="kemo-lease", daemon=True)
        self._thread.start()

    def _renew_once(self) -> None:
        """Rewrite the lease with a new renewal time, only if it is still the version we wrote last."""
        with self._lock:
            if self.lost:
                return
            body = {**self.body, "renewed_at": utc_now(), "renewed_unix": time.time()}
            ok, version = storage.replace_if_version(self.uri, json_bytes(body), self.version)
            if not ok:
                version = self._whose(body)
                if version is None:
                    log.error("lost the lease %s: %s", self.uri, self.lost)
                    return
            self.body, self.version, self.renewed = body, version, time.time()

    def _whose(self, body: dict[str, Any]) -> str | None:
        """After a conditional renewal failed: the lease's version when it holds ``body`` (our own write, applied,
        whose answer was lost and whose retry was refused), else None with ``lost`` saying what happened."""
        try:
            data, version = storage.read_with_version(self.uri)
        except FileNotFoundError:
            self.lost = "its lease file was deleted while it ran (by hand or by a clean-up), and no run holds it"
            return None
        try:
            held = json.loads(data)
        except ValueError:
            held = {}
        if held == body:
            return version
        self.lost = (f"another run took the lease over ({self.describe(held)})" if held.get("run") != body["run"]
                     else "its lease file was rewritten by something other than this run")
        return None

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                self._renew_once()
            except Exception as e:  # a network blip: try again next time; staleness allows ten misses
                log.warning("renewing the lease %s failed: %s", self.uri, e)
            if self.lost:
                return

    def check(self) -> None:
        """Raise unless this run still holds the lease, checked now (before uncommitting, writing a file of the
        commit, or committing): another run may own the output since."""
        if not self.lost and time.time() - self.renewed > self.stale_s:
            self.lost = f"no renewal succeeded for over {self.stale_s:.0f} s: another run may have taken it over"
        if not self.lost:
            self._renew_once()
        if self.lost:
            raise OutputBusy(f"{os.path.dirname(self.uri)}: {self.lost}; this run stops without writing more")

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        with self._lock:
            if not self.lost:  # only the version we wrote: never a lease another run took over meanwhile
                storage.delete_if_version(self.uri, self.version)
