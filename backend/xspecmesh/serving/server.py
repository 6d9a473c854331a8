"""`xspecmesh serve`: the Blender add-on's backend, JSON lines on stdin/stdout (serving/protocol.py), logs on stderr.

Two threads. The reader thread parses every stdin line at once: bad lines get an `error` reply, `generate` requests
are checked (points, settings) and queued, `cancel` and `shutdown` act immediately, even while a mesh decodes. The
main thread runs queued requests in order through `Engine.retopologize` and streams them: `faces` (triangles batched
since the last faces line) and `progress`, each at most every `interval` seconds, every face before a fit starts,
then `done` (with the fitted triangles when the request's settings ask for `fit`). A cancel is seen after the
current decoding step, or once the fit is over.
Only protocol lines reach the real stdout; stray prints (Python or C level) are redirected to stderr.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from xspecmesh import __version__
from xspecmesh.serving import protocol
from xspecmesh.errors import MeshError, XSpecMeshError

if TYPE_CHECKING:  # imported when the server starts (serve_main), so that a missing dependency is one error line
    from xspecmesh.decoding.engine import DecodeSettings, Engine

MAX_LINE_BYTES = 32 << 20  # 200k points are 6.4 MB of base64; anything far longer is refused, not buffered
ZERO_STATS = {"tokens": 0, "steps": 0, "scr": 0.0, "faces": 0, "seconds": 0.0, "tokens_per_second": 0.0}


def log(message: str) -> None:
    print(f"xspecmesh serve: {message}", file=sys.stderr, flush=True)


class OutputClosed(Exception):
    """The other end stopped reading our stdout: nobody is left to answer."""


@dataclass
class QueuedRequest:
    id: str
    points: np.ndarray  # (N, 6) float32, normalized frame
    settings: DecodeSettings


class Server:
    """Protocol dispatch around an `Engine` (xspecmesh.decoding.engine): requests run through its `retopologize`."""

    def __init__(self, engine: Engine, out: BinaryIO, interval: float = 0.1):
        self.engine = engine
        self.out = out
        self.interval = interval
        self._write_lock = threading.Lock()
        self._cond = threading.Condition()
        self._queue: deque[QueuedRequest] = deque()
        self._running: str | None = None
        self._cancel = threading.Event()  # cancels the running job only
        self._stop = False  # shutdown: cancel everything and leave
        self._eof = False  # end of input: finish the queue and leave
        self._broken = False  # stdout is gone

    # ------------------------------------------------------------------------------------------ output

    def send(self, msg: dict) -> None:
        data = protocol.encode(msg)
        with self._write_lock:
            try:
                self.out.write(data)
                self.out.flush()
            except (OSError, ValueError) as exc:  # broken pipe or closed file
                with self._cond:
                    self._stop = self._broken = True
                    self._cancel.set()
                    self._cond.notify_all()
                raise OutputClosed(str(exc)) from None

    # ------------------------------------------------------------------------------------------ input (reader thread)

    def read_forever(self, inp: BinaryIO) -> None:
        """Handle stdin lines until end of input or a shutdown request."""
        try:
            while not self._stop:
                line = inp.readline(MAX_LINE_BYTES + 1)
                if not line:
                    break
                if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                    while line and not line.endswith(b"\n"):  # skip the rest of this line
                        line = inp.readline(1 << 20)
                    self.send(protocol.error(None, f"line longer than {MAX_LINE_BYTES} bytes; ignored"))
                    continue
                self.handle_line(line)
        except OutputClosed:
            return
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def handle_line(self, line: bytes) -> None:
        if not line.strip():
            return
        rid = None
        try:
            req = protocol.read_request(line)
            rid = req.get("id")
            if req["type"] == "shutdown":
                self.shutdown()
            elif req["type"] == "cancel":
                self.cancel(rid)
            else:
                self.submit(req)
        except protocol.ProtocolError as exc:
            self.send(protocol.error(exc.request_id, str(exc)))
        except XSpecMeshError as exc:
            self.send(protocol.error(rid, str(exc)))
        except OutputClosed:
            raise
        except Exception as exc:  # a bug of ours; keep serving
            traceback.print_exc(file=sys.stderr)
            self.send(protocol.error(rid, f"internal error: {type(exc).__name__}: {exc}"))

    def submit(self, req: dict) -> None:
        rid, count = req["id"], req["count"]
        points = np.frombuffer(req["points"], dtype="<f4").astype(np.float32).reshape(count, 6)
        if not np.isfinite(points).all():
            bad = int((~np.isfinite(points)).any(axis=1).sum())
            raise MeshError(f"points contain NaN or infinite values ({bad} of {count} points)")
        from xspecmesh.decoding.engine import DecodeSettings  # noqa: F811 (loaded already: the engine runs)

        settings = DecodeSettings.from_dict(req.get("settings", {})).validate(self.engine.max_heads)
        job = QueuedRequest(rid, points, settings)
        with self._cond:
            if self._stop:
                raise XSpecMeshError("the backend is shutting down")
            if rid == self._running or any(j.id == rid for j in self._queue):
                raise XSpecMeshError(f"request id {rid!r} is already queued or running")
            self._queue.append(job)
            self._cond.notify_all()

    def cancel(self, rid: str) -> None:
        with self._cond:
            if rid == self._running:
                self._cancel.set()
                return
            job = next((j for j in self._queue if j.id == rid), None)
            if job is not None:
                self._queue.remove(job)
        if job is None:
            log(f"cancel {rid!r}: no such queued or running request (already done?); ignored")
        else:
            self.send(protocol.done(rid, ZERO_STATS, cancelled=True))

    def shutdown(self) -> None:
        with self._cond:
            self._stop = True
            self._cancel.set()
            dropped = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in dropped:
            self.send(protocol.done(job.id, ZERO_STATS, cancelled=True))

    # ------------------------------------------------------------------------------------------ decoding (main thread)

    def run(self) -> int:
        """Decode queued requests in order until shutdown, or until end of input with an empty queue."""
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._stop and not self._eof:
                        self._cond.wait()
                    if not self._queue:
                        return 1 if self._broken else 0
                    job = self._queue.popleft()
                    self._running = job.id
                    self._cancel.clear()
                try:
                    self.decode(job)
                finally:
                    with self._cond:
                        self._running = None
        except OutputClosed as exc:
            log(f"stdout closed ({exc}); exiting")
            return 1

    def decode(self, job: QueuedRequest) -> None:
        stats: dict = {}
        tris: list[np.ndarray] = []  # this request's triangles so far; tris[sent:] are not sent yet
        sent = 0
        fitted = None
        last_faces = last_progress = -float("inf")
        cancelled = self._cancel.is_set()  # cancelled before it started: nothing to decode
        try:
            stream = (u for u in ()) if cancelled else self.engine.retopologize(job.points, job.settings,
                                                                               self._cancel.is_set)
            try:
                for upd in stream:
                    stats, fitted = upd.stats, upd.fitted
                    if len(upd.triangles):
                        tris.append(upd.triangles)
                    # (the last update is a finished request: the engine has looked for a cancel during its fit)
                    if upd.cancelled or (self._cancel.is_set() and not upd.done):
                        cancelled = True
                        break
                    now = time.monotonic()
                    if sent < len(tris) and (upd.decoded or now - last_faces >= self.interval):
                        sent = self._flush(job.id, tris, sent)  # every face goes out before a fit starts
                        last_faces = now
                    if not upd.decoded and now - last_progress >= self.interval:
                        self.send(protocol.progress(job.id, stats))
                        last_progress = now
                    if "fit_error" in stats:
                        log(f"request {job.id!r}: fit failed, sending the mesh as decoded: {stats['fit_error']}")
            finally:
                stream.close()
            self._flush(job.id, tris, sent)
            self.send(protocol.done(job.id, stats or ZERO_STATS, cancelled=cancelled,
                                    fitted=None if fitted is None else fitted.tolist()))
        except OutputClosed:
            raise
        except XSpecMeshError as exc:
            self.send(protocol.error(job.id, str(exc)))
        except Exception as exc:
            print(f"xspecmesh serve: request {job.id!r} failed:", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            self.send(protocol.error(job.id, f"decoding failed: {type(exc).__name__}: {exc}"))

    def _flush(self, rid: str, tris: list[np.ndarray], sent: int) -> int:
        """Send tris[sent:] as one faces line (if any); returns how many chunks are now sent."""
        if sent < len(tris):
            batch = np.concatenate(tris[sent:]).astype(np.float32).reshape(-1, 3, 3)
            self.send(protocol.faces(rid, batch.tolist()))
        return len(tris)


def serve_main(checkpoint: str | None = None, device: str = "auto", precision: str = "auto") -> int:
    """Entry point of `xspecmesh serve`: guard stdout, load the model once, say hello, serve until told to stop."""
    sys.stdout.flush()
    try:
        out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # C-level writes to fd 1 now land on stderr
    except (AttributeError, OSError, ValueError):  # no real file descriptors (embedded use)
        out = sys.stdout.buffer
    sys.stdout = sys.stderr

    def reply_once(msg: dict) -> None:
        out.write(protocol.encode(msg))
        out.flush()

    try:
        from xspecmesh.decoding.engine import Engine

        engine = Engine.load(checkpoint, device=device, precision=precision)
    except XSpecMeshError as exc:
        log(f"cannot load the model: {exc}")
        reply_once(protocol.error(None, f"cannot load the model: {exc}"))
        return 2
    except ImportError as exc:
        traceback.print_exc(file=sys.stderr)
        reply_once(protocol.error(None, f"the backend's Python lacks a dependency: {exc}"))
        return 2
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        reply_once(protocol.error(None, f"cannot start the backend: {type(exc).__name__}: {exc}"))
        return 2

    info = {"version": __version__, **engine.info}
    log(f"ready: {info}")
    server = Server(engine, out)
    try:
        server.send(protocol.hello(info))
    except OutputClosed:
        return 1
    reader = threading.Thread(target=server.read_forever, args=(sys.stdin.buffer,), name="stdin", daemon=True)
    reader.start()
    code = server.run()
    reader.join(timeout=1.0)
    if reader.is_alive():  # blocked on stdin after our stdout broke: do not let it stall interpreter shutdown
        sys.stderr.flush()
        os._exit(code)
    return code
