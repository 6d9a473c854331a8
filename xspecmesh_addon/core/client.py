"""Run and talk to the `xspecmesh serve` backend: a subprocess in its own Python (the one with torch), a reader
thread that turns its stdout lines into messages on a queue, and non-blocking `poll` for Blender's timers.

Standard library only (no numpy, no bpy); works on Python 3.11 and 3.13. Protocol: protocol.py next to this file.
"""
from __future__ import annotations

import collections
import os
import queue
import shutil
import subprocess
import tempfile
import threading

from . import protocol

# Variables of Blender's own Python that must not leak into the backend's interpreter.
_SCRUBBED_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "__PYVENV_LAUNCHER__")
_STDERR_LINES = 200


def backend_environment(backend_path: str | None = None) -> dict[str, str]:
    """Blender's environment without its Python variables, unbuffered UTF-8, `backend_path` on the import path."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    if backend_path:
        env["PYTHONPATH"] = backend_path
    return env


class BackendError(RuntimeError):
    """The backend cannot be started or is gone; the message is meant for the user as it is."""


class BackendClient:
    """One backend process. `start()` → hello; `generate`/`cancel`; `poll()` → replies; `close()`."""

    def __init__(self, python: str, checkpoint: str | None = None, device: str = "auto",
                 backend_path: str | None = None, precision: str = "auto"):
        self.python = python
        self.checkpoint = checkpoint
        self.device = device
        self.precision = precision
        self.backend_path = backend_path
        self.hello: dict | None = None
        self._proc: subprocess.Popen | None = None
        self._messages: queue.Queue = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=_STDERR_LINES)
        self._threads: list[threading.Thread] = []
        self._write_lock = threading.Lock()
        self._closing = False
        self._tmpdir: str | None = None

    # ------------------------------------------------------------------------------------------ process

    def command(self) -> list[str]:
        cmd = [self.python, "-u", "-m", "xspecmesh", "serve", "--device", self.device]
        if self.checkpoint:
            cmd += ["--checkpoint", self.checkpoint]
        if self.precision != "auto":  # auto is the backend's default; omitted, older backends start too
            cmd += ["--precision", self.precision]
        return cmd

    def environment(self) -> dict[str, str]:
        return backend_environment(self.backend_path)

    def start(self, timeout: float = 120.0) -> dict:
        """Launch the backend and wait for its hello (model loaded). Raises BackendError with the reason."""
        if self._proc is not None:
            raise BackendError("backend already started")
        if not (os.path.isfile(self.python) or shutil.which(self.python)):
            raise BackendError(f"backend Python not found: {self.python!r} (check the add-on preferences)")
        self._tmpdir = tempfile.mkdtemp(prefix="xspecmesh-")
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0) if os.name == "nt" else 0
        try:
            self._proc = subprocess.Popen(
                self.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=self._tmpdir, env=self.environment(), creationflags=flags)
        except OSError as exc:
            self._cleanup_tmpdir()
            raise BackendError(f"cannot run the backend Python {self.python!r}: {exc}") from None
        for target in (self._read_stderr, self._read_stdout):  # stderr first: the stdout reader waits on it
            thread = threading.Thread(target=target, args=(self._proc,), daemon=True,
                                      name=f"xspecmesh-{target.__name__}")
            self._threads.append(thread)
            thread.start()
        try:
            msg = self._messages.get(timeout=timeout)
        except queue.Empty:
            self.close(timeout=1.0)
            raise BackendError(f"backend gave no answer within {timeout:g} s{self._tail_text()}") from None
        if msg.get("type") == "hello":
            try:
                protocol.validate_reply(msg)
            except protocol.ProtocolError as exc:
                self.close(timeout=2.0)
                raise BackendError(str(exc)) from None
            self.hello = msg
            return msg
        self.close(timeout=2.0)
        raise BackendError(f"backend failed to start: {self._diagnose(msg.get('message', msg))}")

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self, timeout: float = 5.0) -> None:
        """Ask the backend to shut down, then terminate/kill it if needed; always reaps the process."""
        self._closing = True
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                self._write(protocol.shutdown())
            except BackendError:
                pass
            try:
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=2.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        proc.wait()
        for thread in self._threads:
            thread.join(timeout=2.0)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            try:
                pipe.close()
            except OSError:
                pass
        self._cleanup_tmpdir()

    def __enter__(self) -> BackendClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ messages

    def send(self, msg: dict) -> None:
        if not self.alive:
            raise BackendError(f"backend is not running{self._exit_text()}")
        self._write(msg)

    def generate(self, request_id: str, points: bytes | memoryview, count: int, settings: dict,
                 more: bool = False) -> str:
        """Queue one mesh: `points` are float32 N×6 (xyz + normal, normalized frame), N = `count`; `more`: more
        requests follow at once (a collection), which the backend then decodes together."""
        self.send(protocol.generate(request_id, points, count, settings, more))
        return request_id

    def cancel(self, request_id: str) -> None:
        self.send(protocol.cancel(request_id))

    def poll(self, timeout: float = 0.0) -> list[dict]:
        """Every reply received so far (waits up to `timeout` s for the first). If the backend died, the last item
        is an error message with id None saying so."""
        out = []
        try:
            out.append(self._messages.get(timeout=timeout) if timeout > 0 else self._messages.get_nowait())
            while True:
                out.append(self._messages.get_nowait())
        except queue.Empty:
            return out

    def stderr_tail(self, lines: int = 20) -> str:
        return "\n".join(list(self._stderr)[-lines:])

    # ------------------------------------------------------------------------------------------ internals

    def _write(self, msg: dict) -> None:
        data = protocol.encode(msg)
        with self._write_lock:
            try:
                self._proc.stdin.write(data)
                self._proc.stdin.flush()
            except (OSError, ValueError):
                raise BackendError(f"backend is not running{self._exit_text()}") from None

    def _read_stdout(self, proc: subprocess.Popen) -> None:
        for line in iter(proc.stdout.readline, b""):
            try:
                msg = protocol.validate_reply(protocol.decode(line))
            except protocol.ProtocolError as exc:
                msg = protocol.error(None, f"backend wrote an invalid line ({exc}): {line[:120]!r}")
            self._messages.put(msg)
        try:
            code = proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            code = None
        self._threads[0].join(timeout=2.0)  # the stderr reader: collect the last words
        if not self._closing:
            self._messages.put(protocol.error(
                None, f"backend exited unexpectedly (code {code}): {self.stderr_tail(8) or '(no output)'}"))

    def _read_stderr(self, proc: subprocess.Popen) -> None:
        for raw in iter(proc.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            self._stderr.append(line)

    def _diagnose(self, message) -> str:
        """The user-facing reason for a failed start: the backend's own error line, or what its stderr shows."""
        text = f"{self.stderr_tail(_STDERR_LINES)}\n{message}"
        if "No module named xspecmesh" in text or "No module named 'xspecmesh'" in text:
            return (f"{self.python} cannot import the xspecmesh backend package; install it into that Python "
                    f"(or use the bundled copy){self._tail_text()}")
        if "No module named 'torch'" in text:
            return f"{self.python} has no PyTorch; install torch into that Python"
        return str(message)

    def _exit_text(self) -> str:
        code = None if self._proc is None else self._proc.poll()
        return "" if code is None else f" (exit code {code}){self._tail_text()}"

    def _tail_text(self) -> str:
        tail = self.stderr_tail(8)
        return f"\n{tail}" if tail else ""

    def _cleanup_tmpdir(self) -> None:
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
