"""The one backend process this Blender session talks to (started on demand, reused, stopped on exit).

Bpy-free: the caller passes the preference values. The process is restarted when the interpreter, checkpoint or
device changes, or when it died. Starting takes seconds (torch import, checkpoint load), so `begin` does it in a
worker thread and returns a `Startup` the caller polls, which keeps Blender's UI drawing meanwhile; `ensure` is the
blocking form. `heads_cap()` and `describe()` read what the backend said at start (versions, device, checkpoint,
heads).
"""
from __future__ import annotations

import atexit
import re
import threading

from . import locations
from .client import BackendClient

START_TIMEOUT = 120.0  # seconds: the first start imports torch and loads the checkpoint

_client: BackendClient | None = None
_key: tuple | None = None
_hello: dict | None = None
_starting: "Startup | None" = None


class BackendUnavailable(RuntimeError):
    """The backend could not be started; the message says why in words."""


class Startup:
    """A backend start under way in a worker thread (or one already finished: the running client)."""

    def __init__(self, key: tuple, client: BackendClient, running: bool = False):
        self.key, self.client, self.error = key, client, None
        self._lock = threading.Lock()
        self._finished = running
        self._abandoned = False
        self._thread = None if running else threading.Thread(target=self._start, daemon=True,
                                                             name="xspecmesh-backend-start")
        if self._thread is not None:
            self._thread.start()

    def _start(self) -> None:
        try:
            self.client.start(timeout=START_TIMEOUT)
        except Exception as exc:  # handed to the main thread by `adopt`
            self.error = exc
        with self._lock:
            self._finished = True
            if self._abandoned:
                _close_quietly(self.client)

    def abandon(self) -> None:
        """Nobody wants this backend any more: stop it now, or as soon as its start returns."""
        with self._lock:
            self._abandoned = True
            if self._finished:
                _close_quietly(self.client)

    def wait(self, timeout: float | None = 0.0) -> bool:
        """True once the start has finished (well or not)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self._thread is None or not self._thread.is_alive()


def configuration(python: str, checkpoint: str, device: str, precision: str = "auto") -> tuple:
    python = python.strip() or locations.default_backend_python()
    if not python:
        raise BackendUnavailable(
            "No backend Python is set: in Preferences › Add-ons › XSpecMesh press Install Backend, or point "
            "'Backend Python' at a Python that has torch (e.g. the project's .venv)")
    return (python, checkpoint.strip() or locations.default_checkpoint() or None, device or "auto",
            locations.backend_path(), precision or "auto")


def begin(python: str, checkpoint: str = "", device: str = "auto", precision: str = "auto") -> Startup:
    """The running backend for these settings, or a start of one (restarting when the settings changed)."""
    global _starting
    key = configuration(python, checkpoint, device, precision)
    if _client is not None and _client.alive and key == _key:
        return Startup(key, _client, running=True)
    if _starting is not None and _starting.key == key:
        return _starting
    stop()
    _starting = Startup(key, BackendClient(key[0], checkpoint=key[1], device=key[2], backend_path=key[3],
                                                precision=key[4]))
    return _starting


def adopt(startup: Startup) -> BackendClient:
    """Take a finished start's client as the session's backend; raises BackendUnavailable when it failed."""
    global _client, _key, _hello, _starting
    if _starting is startup:
        _starting = None
    if startup.client is _client:
        return _client
    if startup.error is not None or startup.client.hello is None:
        _close_quietly(startup.client)
        print(f"XSpecMesh: backend did not start: {startup.error}")
        raise BackendUnavailable(f"Backend did not start: {readable(str(startup.error), startup.key[0])}")
    stop()
    _client, _key, _hello = startup.client, startup.key, dict(startup.client.hello)
    return _client


def ensure(python: str, checkpoint: str = "", device: str = "auto", precision: str = "auto") -> BackendClient:
    """A running client for these settings, starting (or restarting) the backend and waiting for it."""
    startup = begin(python, checkpoint, device, precision)
    startup.wait(None)
    return adopt(startup)


def readable(text: str, python: str | None = None) -> str:
    """One line a user can act on, from a client message that may carry a traceback tail (printed to the console
    in full by the caller)."""
    missing = re.search(r"No module named '([\w.]+)'", text)
    if missing:
        module = missing.group(1).split(".")[0]
        who = f"The backend Python {python}" if python else "The backend Python"
        if module == "xspecmesh":
            return f"{who} cannot import the xspecmesh backend package"
        return (f"{who} has no '{module}' module: it needs torch and the xspecmesh dependencies "
                f"(use the project's .venv, see the README)")
    died = re.match(r"backend exited unexpectedly \((code [^)]*)\)", text)
    if died:
        return f"The backend stopped unexpectedly ({died.group(1)}); its last output is in the system console"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "unknown error"


def current() -> BackendClient | None:
    return _client if _client is not None and _client.alive else None


def heads_cap() -> int | None:
    """Drafting heads in the loaded checkpoint, once the backend said hello."""
    heads = (_hello or {}).get("heads")
    return int(heads) if isinstance(heads, int) and heads > 0 else None


def describe() -> str:
    h = _hello or {}
    parts = [f"xspecmesh {h.get('version', '?')}", f"torch {h.get('torch', '?')}", f"device {h.get('device', '?')}"]
    if h.get("heads") is not None:
        parts.append(f"{h['heads']} heads")
    if h.get("checkpoint"):
        parts.append(f"checkpoint {h['checkpoint']}")
    return ", ".join(parts)


def forget() -> None:
    """Drop a client that died (its process is gone), so the next job starts a fresh one."""
    global _client, _key
    if _client is not None and not _client.alive:
        _close_quietly(_client)
        _client, _key = None, None


def stop() -> None:
    """Stop the backend (and any start under way). The checkpoint's heads stay known for the panel."""
    global _client, _key, _starting
    if _starting is not None:
        _starting.abandon()
        _starting = None
    if _client is not None:
        _close_quietly(_client)
    _client, _key = None, None


def _close_quietly(client: BackendClient) -> None:
    try:
        client.close()
    except Exception:
        pass


atexit.register(stop)
