"""`xspecmesh serve`: the Blender add-on's backend, JSON lines on stdin/stdout (serving/protocol.py), logs on stderr.

Two threads. The reader thread parses every stdin line at once: bad lines get an `error` reply, `generate` requests
are checked (points, settings) and queued, `cancel` and `shutdown` act immediately, even while a mesh decodes. The
main thread runs queued requests in order through `Engine.retopologize` and streams them: `faces` (triangles batched
since the last faces line) and `progress`, each at most every `interval` seconds, every face before a fit starts,
then `done` (with the fitted triangles when the request's settings ask for `fit`). A cancel is seen after the
current decoding step, or once the fit is over.

Batching (`serve --batch B`, B > 1): the main thread takes the first queued request together with every queued one that
shares its decode settings (all but seed and limits) and decodes them with `Engine.stream_batch`, B at a time (a
waiting request takes the place of one that finished; naive: in rounds of B); each keeps its own stream of lines, and a
cancel drops only its request. Requests that arrive meanwhile wait for the next group. A request marked `"more": true`
holds the start of new work until a request without it arrives, so a client can queue a whole collection before the
first object starts.
Only protocol lines reach the real stdout; stray prints (Python or C level) are redirected to stderr.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections import deque
from contextlib import contextmanager
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

    def __init__(self, engine: Engine, out: BinaryIO, interval: float = 0.1, batch: int = 1):
        self.engine = engine
        self.batch = batch
        self.out = out
        self.interval = interval
        self._write_lock = threading.Lock()
        self._cond = threading.Condition()
        self._queue: deque[QueuedRequest] = deque()
        self._running: set[str] = set()
        self._cancelled: set[str] = set()  # running requests asked to stop
        self._holding = False  # the last request said "more": wait for the rest before starting new work
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
        try:
            job = self._checked(req)
        except Exception:  # a refused request still ends (or continues) a held collection
            with self._cond:
                self._holding = req.get("more") is True
                self._cond.notify_all()
            raise
        with self._cond:
            self._holding = req.get("more") is True  # set with the append: the queue never starts half-held
            if self._stop:
                raise XSpecMeshError("the backend is shutting down")
            if job.id in self._running or any(j.id == job.id for j in self._queue):
                raise XSpecMeshError(f"request id {job.id!r} is already queued or running")
            self._queue.append(job)
            self._cond.notify_all()

    def _checked(self, req: dict) -> QueuedRequest:
        rid, count = req["id"], req["count"]
        points = np.frombuffer(req["points"], dtype="<f4").astype(np.float32).reshape(count, 6)
        if not np.isfinite(points).all():
            bad = int((~np.isfinite(points)).any(axis=1).sum())
            raise MeshError(f"points contain NaN or infinite values ({bad} of {count} points)")
        from xspecmesh.decoding.engine import DecodeSettings  # noqa: F811 (loaded already: the engine runs)

        settings = DecodeSettings.from_dict(req.get("settings", {}), self.engine.max_heads).validate(
            self.engine.max_heads)
        return QueuedRequest(rid, points, settings)

    def cancel(self, rid: str) -> None:
        with self._cond:
            if rid in self._running:
                self._cancelled.add(rid)
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
                    while (not self._queue or self._holding) and not self._stop and not self._eof:
                        self._cond.wait()
                    if not self._queue:
                        return 1 if self._broken else 0
                    jobs = self._take()
                    self._running = {j.id for j in jobs}
                    self._cancelled.clear()
                try:
                    if len(jobs) == 1:
                        self.decode(jobs[0])
                    else:
                        self.decode_batch(jobs)
                finally:
                    with self._cond:
                        self._running = set()
        except OutputClosed as exc:
            log(f"stdout closed ({exc}); exiting")
            return 1

    def _take(self) -> list[QueuedRequest]:
        """The next request, and (when batching) every queued one that can share its batch (lock held)."""
        from xspecmesh.decoding.engine import batch_key

        first = self._queue.popleft()
        jobs = [first]
        if self.batch > 1:
            key = batch_key(first.settings)
            for job in [j for j in self._queue if batch_key(j.settings) == key]:
                self._queue.remove(job)
                jobs.append(job)
        return jobs

    def _is_cancelled(self, rid: str) -> bool:
        return self._stop or rid in self._cancelled

    def decode(self, job: QueuedRequest) -> None:
        reply = Reply(self, job)
        with reply.failures():
            cancelled = self._is_cancelled(job.id)  # cancelled before it started: nothing to decode
            stream = (u for u in ()) if cancelled else self.engine.retopologize(
                job.points, job.settings, lambda: self._is_cancelled(job.id))
            try:
                for upd in stream:
                    if not reply.update(upd):
                        cancelled = True
                        break
            finally:
                stream.close()
            reply.finish(cancelled)

    def decode_batch(self, jobs: list[QueuedRequest]) -> None:
        """Several requests, `batch` at a time: one whose points the engine refuses fails alone; a cancelled one
        leaves the batch at the next step (its `done` says cancelled), the others go on."""
        replies, conds = [], []
        for job in jobs:
            reply = Reply(self, job)
            with reply.failures():
                conds.append(self.engine.at_precision(job.settings.precision).condition(job.points, job.settings.seed))
                replies.append(reply)
        if not replies:
            return
        stop: set[int] = set()
        running = set(range(len(replies)))
        with replies[0].failures(others=replies[1:]):
            stream = self.engine.stream_batch(conds, [r.job.settings for r in replies], stop, self.batch,
                                              points=[r.job.points for r in replies],
                                              cancelled=lambda i: self._is_cancelled(replies[i].job.id))
            try:
                for i, upd in stream:
                    if not replies[i].update(upd):
                        stop.add(i)
                    if upd.done or i in stop:
                        running.discard(i)
                        with replies[i].failures():
                            replies[i].finish(i in stop)
                    for j in [j for j in running if self._is_cancelled(replies[j].job.id)]:  # waiting ones too
                        stop.add(j)
                        running.discard(j)
                        replies[j].finish(True)
            finally:
                stream.close()
            for j in sorted(running):  # what the stream never finished (none unless the engine stopped early)
                replies[j].finish(self._is_cancelled(replies[j].job.id))


class Reply:
    """One request's answer: its triangles (tris[sent:] not sent yet), faces and progress lines at most every
    `interval` (every face before a fit starts), and the final `done` or `error`."""

    def __init__(self, server: Server, job: QueuedRequest):
        self.server, self.job = server, job
        self.stats: dict = {}
        self.fitted = None
        self.tris: list[np.ndarray] = []
        self.sent = 0
        self.last_faces = self.last_progress = -float("inf")
        self.answered = False

    def update(self, upd) -> bool:
        """Take one engine update and send what is due; False when the request was cancelled."""
        self.stats, self.fitted = upd.stats, upd.fitted
        if len(upd.triangles):
            self.tris.append(upd.triangles)
        # (the last update is a finished request: the engine has looked for a cancel during its fit)
        if upd.cancelled or (self.server._is_cancelled(self.job.id) and not upd.done):
            return False
        now = time.monotonic()
        if self.sent < len(self.tris) and (upd.decoded or now - self.last_faces >= self.server.interval):
            self.flush()  # every face goes out before a fit starts
            self.last_faces = now
        if not upd.decoded and now - self.last_progress >= self.server.interval:
            self.server.send(protocol.progress(self.job.id, self.stats))
            self.last_progress = now
        if "fit_error" in self.stats:
            log(f"request {self.job.id!r}: fit failed, sending the mesh as decoded: {self.stats['fit_error']}")
        return True

    def flush(self) -> None:
        """Send tris[sent:] as one faces line (if any)."""
        if self.sent < len(self.tris):
            batch = np.concatenate(self.tris[self.sent:]).astype(np.float32).reshape(-1, 3, 3)
            self.server.send(protocol.faces(self.job.id, batch.tolist()))
        self.sent = len(self.tris)

    def finish(self, cancelled: bool) -> None:
        """The remaining faces, then `done`."""
        if self.answered:
            return
        self.flush()
        self.answered = True
        self.server.send(protocol.done(self.job.id, self.stats or ZERO_STATS, cancelled=cancelled,
                                       fitted=None if self.fitted is None or cancelled else self.fitted.tolist()))

    @contextmanager
    def failures(self, others: list["Reply"] = ()):
        """Turn an exception into an `error` line for this request (and `others` not yet answered)."""
        try:
            yield
        except OutputClosed:
            raise
        except Exception as exc:
            if isinstance(exc, XSpecMeshError):
                message = str(exc)
            else:
                print(f"xspecmesh serve: request {self.job.id!r} failed:", file=sys.stderr)
                traceback.print_exc(file=sys.stderr)
                message = f"decoding failed: {type(exc).__name__}: {exc}"
            for reply in [self, *others]:
                if not reply.answered:
                    reply.answered = True
                    self.server.send(protocol.error(reply.job.id, message))


def serve_main(checkpoint: str | None = None, device: str = "auto", precision: str = "auto",
               batch: int = 8) -> int:
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
    server = Server(engine, out, batch=batch)
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
