"""The one backend process this Blender session talks to (started on demand, reused, stopped on exit).

Bpy-free: the caller passes the preference values. The process is restarted when the interpreter, checkpoint or
device changes, or when it died. `hello()` is what it said at start (versions, device, checkpoint, heads).
"""
from __future__ import annotations

import atexit
import re

from . import locations
from .client import BackendClient

START_TIMEOUT = 120.0  # seconds: the first start imports torch and loads the checkpoint

_client: BackendClient | None = None
_key: tuple | None = None
_hello: dict | None = None


class BackendUnavailable(RuntimeError):
    """The backend could not be started; the message says why in words."""


def configuration(python: str, checkpoint: str, device: str) -> tuple:
    python = python.strip() or locations.default_backend_python()
    if not python:
        raise BackendUnavailable(
            "No backend Python is set: in Preferences › Add-ons › XSpecMesh point 'Backend Python' at a Python "
            "that has torch and the xspecmesh package (e.g. the project's .venv)")
    return (python, checkpoint.strip() or locations.default_checkpoint() or None, device or "auto",
            locations.backend_path())


def ensure(python: str, checkpoint: str = "", device: str = "auto") -> BackendClient:
    """A running client for these settings, starting (or restarting) the backend when needed."""
    global _client, _key, _hello
    key = configuration(python, checkpoint, device)
    if _client is not None and _client.alive and key == _key:
        return _client
    stop()
    client = BackendClient(key[0], checkpoint=key[1], device=key[2], backend_path=key[3])
    try:
        hello = client.start(timeout=START_TIMEOUT)
    except Exception as exc:
        _close_quietly(client)
        print(f"XSpecMesh: backend did not start: {exc}")
        raise BackendUnavailable(f"Backend did not start: {readable(str(exc), key[0])}") from None
    _client, _key, _hello = client, key, dict(hello or {})
    return client


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


def hello() -> dict | None:
    return _hello


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
    global _client, _key, _hello
    if _client is not None:
        _close_quietly(_client)
    _client, _key, _hello = None, None, None


def _close_quietly(client: BackendClient) -> None:
    try:
        client.close()
    except Exception:
        pass


atexit.register(stop)
