"""`xspecmesh serve`: dispatch logic against a scripted engine (in-process, fast), then the real server process with
a tiny random checkpoint: a fuzz run and a bad checkpoint."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xspecmesh.decoding.engine import DecodeSettings, Engine, StepUpdate
from xspecmesh.geometry import fit
from xspecmesh.serving import protocol, server


def points_bytes(n: int = 512, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    xyz = rng.uniform(-0.9, 0.9, (n, 3))
    nrm = rng.normal(size=(n, 3))
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
    return np.concatenate([xyz, nrm], 1).astype("<f4").tobytes()


def generate_line(rid: str, settings_: dict | None = None, n: int = 512) -> bytes:
    """A generate request; the scripted engine decodes `max_tokens` steps (5 unless said)."""
    return protocol.encode(protocol.generate(rid, points_bytes(n), n, {"max_tokens": 5, **(settings_ or {})}))


# ------------------------------------------------------------------------------------------------ scripted engine


FAIL_SEED = 666  # the scripted decode of a request with this seed fails at its third step


class ScriptedEngine(Engine):
    """The real pipeline (`Engine.retopologize`: the fit, its stats, a cancel during the fit) over a scripted decoding
    stage: `max_tokens` steps of two triangles each (values = the step index), `delay` seconds apart; a mesh cut by
    `max_faces` is not complete."""

    max_heads = 4

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.streamed: list[DecodeSettings] = []

    def stream(self, points, settings: DecodeSettings):
        assert isinstance(settings, DecodeSettings) and points.dtype == np.float32 and points.shape[1] == 6
        self.streamed.append(settings)
        steps = settings.max_tokens
        for i in range(steps):
            time.sleep(self.delay)
            if i == 2 and settings.seed == FAIL_SEED:
                raise RuntimeError("kaboom")
            tris = np.full((2, 3, 3), i, np.float32)
            stats = {"tokens": i + 1, "steps": i + 1, "scr": 1.0, "faces": (i + 1) * len(tris), "seconds": 0.1,
                     "tokens_per_second": np.float32(10.0), "complete": settings.max_faces is None}
            yield StepUpdate([i], tris, stats, done=i == steps - 1)


class Sink:
    """The server's stdout: collects lines, lets a test wait for a message."""

    def __init__(self):
        self.data = bytearray()
        self.cond = threading.Condition()

    def write(self, b: bytes) -> None:
        with self.cond:
            self.data += b
            self.cond.notify_all()

    def flush(self) -> None:
        pass

    def messages(self) -> list[dict]:
        with self.cond:
            return [json.loads(line) for line in bytes(self.data).splitlines()]

    def wait_for(self, pred, timeout: float = 5.0) -> dict:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for msg in self.messages():
                    if pred(msg):
                        return msg
                assert self.cond.wait(max(0.0, deadline - time.monotonic())), f"timed out: {self.messages()}"


@contextmanager
def serving(interval: float = 0.0, delay: float = 0.0):
    sink, engine = Sink(), ScriptedEngine(delay)
    srv = server.Server(engine, sink, interval=interval)
    codes = []
    worker = threading.Thread(target=lambda: codes.append(srv.run()), daemon=True)
    worker.start()
    try:
        yield srv, sink
    finally:
        srv.shutdown()
        worker.join(5)
    assert codes == [0]
    for msg in sink.messages():
        protocol.validate_reply(msg)


def of(sink: Sink, rid: str) -> list[dict]:
    return [m for m in sink.messages() if m["id"] == rid]


def test_faces_stream_before_done_and_add_up():
    with serving() as (srv, sink):
        srv.handle_line(generate_line("a", {"max_tokens": 5}))
        sink.wait_for(lambda m: m["type"] == "done")
    msgs = of(sink, "a")
    assert msgs[-1]["type"] == "done" and msgs[-1]["cancelled"] is False and msgs[-1]["stats"]["tokens"] == 5
    faces = [t for m in msgs if m["type"] == "faces" for t in m["triangles"]]
    assert [t[0][0] for t in faces] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert msgs[0]["type"] == "faces" and any(m["type"] == "progress" for m in msgs)


def test_faces_and_progress_are_rate_limited_and_flushed_before_done():
    with serving(interval=60.0) as (srv, sink):
        srv.handle_line(generate_line("a", {"max_tokens": 20}))
        sink.wait_for(lambda m: m["type"] == "done")
    kinds = [m["type"] for m in of(sink, "a")]
    assert kinds == ["faces", "progress", "faces", "done"]  # first step at once, the rest in one final batch
    assert sum(len(m["triangles"]) for m in of(sink, "a") if m["type"] == "faces") == 40


def test_fit_goes_with_done_and_a_failing_fit_keeps_the_mesh(monkeypatch):
    calls = []

    def fake_fit(tris, points, config=None):
        calls.append(len(tris))
        sent = [t for m in sink.messages() if m["type"] == "faces" and m["id"] == "a" for t in m["triangles"]]
        assert len(sent) == len(tris)  # every face is out before the fit starts
        return tris + 0.5, {"fit_seconds": 0.0}

    monkeypatch.setattr(fit, "fit_triangles", fake_fit)
    with serving() as (srv, sink):
        srv.handle_line(generate_line("a", {"max_tokens": 3, "fit": True}))
        srv.handle_line(generate_line("cut", {"max_tokens": 3, "fit": True, "max_faces": 6}))  # stopped at a limit
        sink.wait_for(lambda m: m["id"] == "cut" and m["type"] == "done")
    done = of(sink, "a")[-1]
    streamed = [t for m in of(sink, "a") if m["type"] == "faces" for t in m["triangles"]]
    assert calls == [6] and np.array_equal(done["fitted"], np.array(streamed) + 0.5)  # every triangle, in order
    cut = of(sink, "cut")[-1]
    assert "fitted" not in cut and "limit" in cut["stats"]["fit_skipped"]

    def broken_fit(tris, points, config=None):
        raise np.linalg.LinAlgError("singular")

    monkeypatch.setattr(fit, "fit_triangles", broken_fit)
    with serving() as (srv, sink):
        srv.handle_line(generate_line("b", {"max_tokens": 3, "fit": True}))
        sink.wait_for(lambda m: m["id"] == "b" and m["type"] == "done")
    done = of(sink, "b")[-1]
    assert "fitted" not in done and "singular" in done["stats"]["fit_error"] and done["cancelled"] is False
    assert sum(len(m["triangles"]) for m in of(sink, "b") if m["type"] == "faces") == 6  # the mesh itself arrived

    def cancelled_during_fit(tris, points, config=None):
        srv.handle_line(protocol.encode(protocol.cancel("c")))
        return tris + 0.5, {"fit_seconds": 0.0, "fit_distance_after": 0.1}

    monkeypatch.setattr(fit, "fit_triangles", cancelled_during_fit)
    with serving() as (srv, sink):
        srv.handle_line(generate_line("c", {"max_tokens": 3, "fit": True}))
        sink.wait_for(lambda m: m["id"] == "c" and m["type"] == "done")
    done = of(sink, "c")[-1]
    assert done["cancelled"] is True and "fitted" not in done
    assert done["stats"]["fit_skipped"] == "cancelled" and "fit_distance_after" not in done["stats"]


def test_generate_collects_the_pipeline(monkeypatch):
    monkeypatch.setattr(fit, "fit_triangles", lambda tris, points, config=None: (tris + 0.5, {"fit_seconds": 0.0}))
    engine, pts = ScriptedEngine(), np.frombuffer(points_bytes(), "<f4").reshape(-1, 6)
    updates = list(engine.retopologize(pts, DecodeSettings(max_tokens=3, fit=True)))
    assert [(u.decoded, u.done, u.fitted is None) for u in updates] == [(False, False, True)] * 2 + [
        (True, False, True), (True, True, False)]  # the last decoding step, then the fit
    result = engine.generate(pts, DecodeSettings(max_tokens=3, fit=True))
    assert len(result.triangles) == 6 and np.array_equal(result.mesh, result.triangles + 0.5)
    assert result.stats["fit_seconds"] == 0.0 and result.tokens == [0, 1, 2]
    plain = engine.generate(pts, DecodeSettings(max_tokens=3, fit=False))
    assert plain.fitted is None and plain.mesh is plain.triangles and "fit_seconds" not in plain.stats
    last = list(engine.retopologize(pts, DecodeSettings(max_tokens=3, fit=True), cancelled=lambda: True))[-1]
    assert last.cancelled and last.fitted is None and last.stats["fit_skipped"] == "cancelled"


def test_queue_order_and_cancel_of_running_and_queued():
    with serving(delay=0.01) as (srv, sink):
        for rid in "abc":
            srv.handle_line(generate_line(rid, {"max_tokens": 200 if rid != "c" else 3}))
        srv.handle_line(protocol.encode(protocol.cancel("b")))
        sink.wait_for(lambda m: m["id"] == "b" and m["type"] == "done")
        sink.wait_for(lambda m: m["id"] == "a" and m["type"] == "progress")
        srv.handle_line(protocol.encode(protocol.cancel("a")))
        sink.wait_for(lambda m: m["id"] == "c" and m["type"] == "done")
    done = [m for m in sink.messages() if m["type"] == "done"]
    assert [(m["id"], m["cancelled"]) for m in done] == [("b", True), ("a", True), ("c", False)]
    assert 0 < done[1]["stats"]["steps"] < 200 and done[0]["stats"]["tokens"] == 0
    assert len(srv.engine.streamed) == 2  # b never started


def test_bad_requests_get_errors_and_serving_goes_on():
    bad_points = np.frombuffer(points_bytes(), "<f4").copy()
    bad_points[7] = np.nan
    nan_line = json.dumps({"type": "generate", "id": "nan", "count": 512, "settings": {},
                           "points": base64.b64encode(bad_points.tobytes()).decode()}).encode()
    with serving(delay=0.01) as (srv, sink):
        srv.handle_line(generate_line("slow", {"max_tokens": 30}))
        for line in [b"{oops", b'{"type": "dance", "id": "u"}', nan_line, generate_line("h", {"heads": 9}),
                     generate_line("slow"), b"   \n", protocol.encode(protocol.cancel("nobody"))]:
            srv.handle_line(line)
        srv.handle_line(generate_line("ok"))
        sink.wait_for(lambda m: m["id"] == "ok" and m["type"] == "done")
    errors = [(m["id"], m["message"]) for m in sink.messages() if m["type"] == "error"]
    assert [e[0] for e in errors] == [None, "u", "nan", "h", "slow"]
    assert "NaN" in errors[2][1] and "heads must be between 1 and 8" in errors[3][1]
    assert "already queued or running" in errors[4][1]


def test_more_heads_than_the_checkpoint_has_are_all_of_its_heads():
    with serving() as (srv, sink):
        srv.handle_line(generate_line("h", {"heads": 8}))
        srv.handle_line(generate_line("a", {"heads": 8, "mode": "ar"}))
        sink.wait_for(lambda m: m["id"] == "a" and m["type"] == "done")
    assert [s.heads for s in srv.engine.streamed] == [4, 8]  # AR drafts nothing


def test_exception_while_decoding_is_an_error_reply(capsys):
    with serving() as (srv, sink):
        srv.handle_line(generate_line("x", {"seed": FAIL_SEED}))
        srv.handle_line(generate_line("y"))
        sink.wait_for(lambda m: m["id"] == "y" and m["type"] == "done")
    err = [m for m in of(sink, "x") if m["type"] == "error"]
    assert len(err) == 1 and "RuntimeError: kaboom" in err[0]["message"]
    assert "Traceback" in capsys.readouterr().err


def test_shutdown_cancels_running_and_queued():
    sink = Sink()
    srv = server.Server(ScriptedEngine(delay=0.001), sink, interval=0.0)
    inp = io.BytesIO(generate_line("b") + protocol.encode(protocol.shutdown()) + generate_line("never"))
    codes = []
    worker = threading.Thread(target=lambda: codes.append(srv.run()))
    worker.start()
    srv.handle_line(generate_line("a", {"max_tokens": 100000}))
    sink.wait_for(lambda m: m["id"] == "a")  # decoding started
    srv.read_forever(inp)
    worker.join(5)
    assert codes == [0]
    done = [(m["id"], m["cancelled"]) for m in sink.messages() if m["type"] == "done"]
    assert sorted(done) == [("a", True), ("b", True)]
    assert "never" not in {m["id"] for m in sink.messages()}


def test_end_of_input_finishes_the_queue_and_long_lines_are_refused(monkeypatch):
    monkeypatch.setattr(server, "MAX_LINE_BYTES", 1000)
    sink = Sink()
    srv = server.Server(ScriptedEngine(), sink)
    short = protocol.encode({"type": "generate", "id": "s", "points": "", "count": 512})
    srv.read_forever(io.BytesIO(b"x" * 5000 + b"\n" + short + b"garbage"))
    assert srv.run() == 0
    assert [m["message"][:20] for m in sink.messages()] == ["line longer than 100", '"points" holds 0 poi',
                                                            "line is not valid JS"]


def test_broken_stdout_stops_the_server():
    class Broken(Sink):
        def write(self, b):
            raise BrokenPipeError("gone")

    srv = server.Server(ScriptedEngine(), Broken())
    srv.handle_line(generate_line("a"))
    assert srv.run() == 1


STRAY_SCRIPT = r"""
import os, sys
import numpy as np
from xspecmesh.decoding import engine

class Noisy(engine.Engine):
    max_heads = 4
    info = {"device": "cpu", "heads": 4, "checkpoint": "fake"}
    def __init__(self):
        pass
    @classmethod
    def load(cls, checkpoint, device, precision):
        print("stray print while loading")
        os.write(1, b"stray C-level write\n")
        return cls()
    def stream(self, points, settings):
        print("stray print while decoding")
        os.write(1, b"another C-level write\n")
        for i in range(2):
            yield engine.StepUpdate([1], np.zeros((1, 3, 3), np.float32), {"tokens": 1, "steps": 1}, done=i == 1)

engine.Engine = Noisy
from xspecmesh.serving.server import serve_main
sys.exit(serve_main(None, "cpu"))
"""


def test_stray_prints_go_to_stderr_and_end_of_input_exits():
    proc = subprocess.run([sys.executable, "-c", STRAY_SCRIPT], input=generate_line("a") + b"{bad\n",
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    msgs = [protocol.validate_reply(json.loads(line)) for line in proc.stdout.splitlines()]
    kinds = [m["type"] for m in msgs]
    assert kinds[0] == "hello" and kinds[-1] == "done" and kinds.count("error") == 1 and "faces" in kinds
    assert b"stray print while loading" in proc.stderr and b"another C-level write" in proc.stderr


# ------------------------------------------------------------------------------------------------ real server process


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from xspecmesh.model.checkpoint import write_random_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    write_random_checkpoint(str(path), "tiny", heads=4, seed=0)
    return str(path)


def serve_cmd(checkpoint: str) -> list[str]:
    return [sys.executable, "-m", "xspecmesh", "serve", "--device", "cpu", "--checkpoint", checkpoint]


# one torch thread per test server: the test machines have 2 shared cores, and spinning threads starve everyone
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_bad_checkpoint_is_one_error_line_and_exit_2(tmp_path):
    proc = subprocess.run(serve_cmd(str(tmp_path / "missing.safetensors")), stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=120, env=ONE_THREAD)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.stdout, proc.stderr[-2000:])
    msg = json.loads(lines[0])
    assert msg["type"] == "error" and msg["id"] is None and "missing.safetensors" in msg["message"]


class RawServer:
    def __init__(self, checkpoint: str, stderr):
        self.proc = subprocess.Popen(serve_cmd(checkpoint), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=stderr, env=ONE_THREAD)
        self.lines: list[bytes] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in iter(self.proc.stdout.readline, b""):
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()

    def send(self, line: bytes) -> None:
        self.proc.stdin.write(line.rstrip(b"\n") + b"\n")
        self.proc.stdin.flush()

    def wait_for(self, pred, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines:
                    msg = json.loads(line)
                    if pred(msg):
                        return msg
                assert self.cond.wait(max(0.0, deadline - time.monotonic())), self.lines[-5:]


@contextmanager
def raw_server(checkpoint: str, log):
    """A real server process; shut down cleanly (exit code 0) at the end, killed if a test failed first."""
    srv = RawServer(checkpoint, stderr=open(log, "wb"))
    try:
        yield srv
        srv.send(protocol.encode(protocol.shutdown()))
        assert srv.proc.wait(timeout=30) == 0
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
        srv.proc.wait()
        print("server stderr (tail):", log.read_text(errors="replace")[-3000:])  # shown when the test fails


SMALL = {"mode": "spec", "heads": 2, "max_tokens": 12, "seed": 1}
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                    max_leaves=8)
SETTING_KEYS = ["mode", "heads", "delta", "accept", "topk_accept", "temperature", "top_k", "top_p", "max_tokens",
                "max_faces", "seed", "candidates", "fit", "bogus"]


@st.composite
def fuzz_lines(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "object", "generate", "settings"]))
    if kind == "bytes":
        return draw(st.binary(max_size=80)).replace(b"\n", b" ")
    if kind == "object":
        msg = draw(st.dictionaries(st.sampled_from(["type", "id", "points", "count", "settings", "x"]), JSON,
                                   max_size=5))
        if draw(st.booleans()):
            msg["type"] = draw(st.sampled_from(["generate", "cancel", "hello", "done", "", "GENERATE"]))
    else:
        n = draw(st.sampled_from([512, 513]))
        msg = {"type": "generate", "id": draw(st.text(min_size=1, max_size=6)), "count": 512,
               "points": base64.b64encode(points_bytes(n)).decode(), "settings": dict(SMALL)}
        target = msg if kind == "generate" else msg["settings"]
        key = draw(st.sampled_from(list(target) + SETTING_KEYS if kind == "settings" else list(target)))
        if key == "type" or draw(st.booleans()):
            target[key] = draw(JSON)
        else:
            target.pop(key, None)
    if msg.get("type") == "shutdown":
        msg["type"] = "shut down"
    return json.dumps(msg, allow_nan=True).encode()


def test_fuzzed_lines_never_break_the_server(checkpoint, tmp_path):
    sent: list[bytes] = []
    with raw_server(checkpoint, tmp_path / "stderr.txt") as srv:
        hello = srv.wait_for(lambda m: m["type"] == "hello")
        assert hello["protocol"] == 1 and hello["heads"] == 4

        @settings(max_examples=240, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
        @given(fuzz_lines())
        def feed(line):
            srv.send(line)
            sent.append(line)
            try:  # a request that happened to be valid is cancelled at once, queued or running
                rid = json.loads(line).get("id")
            except (ValueError, AttributeError):
                return
            if isinstance(rid, str) and 0 < len(rid) <= 128:
                srv.send(protocol.encode(protocol.cancel(rid)))

        feed()
        srv.send(generate_line("final", SMALL))
        done = srv.wait_for(lambda m: m["id"] == "final" and m["type"] in ("done", "error"), timeout=180)
        assert done["type"] == "done" and not done["cancelled"], done
        assert len(sent) >= 200
        msgs = [protocol.validate_reply(json.loads(line)) for line in srv.lines]  # every line is protocol JSON
        tally = {k: sum(m["type"] == k for m in msgs) for k in protocol.REPLY_TYPES}
        print(f"{len(sent)} fuzzed lines -> replies {tally}")
        assert tally["error"] >= len(sent) // 2


def test_fit_setting_sends_the_fitted_mesh_with_done(tmp_path):
    """The shipped model on a box's points: with {"fit": true} the done line carries every streamed triangle, in order,
    moved but still connected the same way (corners that coincided still coincide); without it, no "fitted"."""
    import trimesh

    from xspecmesh.model.checkpoint import DEFAULT_CHECKPOINT
    from xspecmesh.geometry.mesh import normalize, sample_surface

    box = trimesh.creation.box((2.0, 0.6, 1.3))
    box.vertices = normalize(box.vertices)[0]
    pts = sample_surface(box, 4096).astype("<f4")
    with raw_server(str(DEFAULT_CHECKPOINT), tmp_path / "stderr.txt") as srv:
        srv.wait_for(lambda m: m["type"] == "hello")
        for rid, fit in (("plain", False), ("fit", True)):
            settings_ = {"mode": "ar", "seed": 0, "fit": fit}
            srv.send(protocol.encode(protocol.generate(rid, pts.tobytes(), len(pts), settings_)))
            done = srv.wait_for(lambda m: m["id"] == rid and m["type"] in ("done", "error"), timeout=60)
            assert done["type"] == "done", done
            streamed = np.array([t for line in srv.lines for m in [json.loads(line)]
                                 if m["id"] == rid and m["type"] == "faces" for t in m["triangles"]]).reshape(-1, 3)
            if not fit:
                assert "fitted" not in done
                continue
            assert len(streamed) > 0 and "fit_distance_after" in done["stats"]
            fitted = np.array(done["fitted"]).reshape(-1, 3)
            assert fitted.shape == streamed.shape and not np.allclose(fitted, streamed)
            _, before = np.unique(streamed, axis=0, return_inverse=True)
            _, after = np.unique(fitted, axis=0, return_inverse=True)
            pairs = set(zip(before.ravel(), after.ravel()))
            assert len(pairs) == len(set(before.ravel())) == len(set(after.ravel()))  # same corners coincide


def test_candidates_stream_the_kept_mesh_once(checkpoint, tmp_path):
    """A request with candidates = 3 through a real server: progress while the three decode, then the kept one's
    faces, and done naming which seed it was."""
    pts = np.frombuffer(points_bytes(), dtype="<f4").reshape(-1, 6)
    with raw_server(checkpoint, tmp_path / "stderr.txt") as srv:
        srv.wait_for(lambda m: m["type"] == "hello")
        settings_ = {"mode": "ar", "max_tokens": 40, "seed": 3, "candidates": 3, "fit": False}
        srv.send(protocol.encode(protocol.generate("c", pts.tobytes(), len(pts), settings_)))
        done = srv.wait_for(lambda m: m["id"] == "c" and m["type"] in ("done", "error"), timeout=60)
        assert done["type"] == "done", done
        msgs = [json.loads(line) for line in srv.lines]
        faces = [t for m in msgs if m.get("id") == "c" and m["type"] == "faces" for t in m["triangles"]]
    assert done["stats"]["candidates"] == 3 and done["stats"]["candidate"] in (0, 1, 2)
    assert len(faces) == done["stats"]["faces"]
