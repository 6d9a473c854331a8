"""`serve --batch B`: queued requests with the same settings decode together, each with its own stream of lines,
its own result (the tokens of decoding it alone, greedy) and its own cancel. In-process, tiny random checkpoint."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from xspecmesh.decoding.engine import Engine
from xspecmesh.geometry import tokenizer as tok
from xspecmesh.model.checkpoint import write_random_checkpoint
from xspecmesh.serving import protocol, server

from test_server import Sink, points_bytes

GREEDY = {"mode": "spec", "accept": "greedy", "temperature": 0.0, "max_tokens": 120}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    eng = Engine.load(str(write_random_checkpoint(tmp_path_factory.mktemp("ck") / "t.safetensors", "tiny", heads=4)),
                      "cpu")
    with torch.no_grad():
        eng.model.to_logits.bias[tok.EOS] -= 1e4  # no early EOS: every request runs to its own limit
    return eng


def serve(engine, lines, on_message=None):
    """Run a batching server over `lines`; returns its messages (after end of input and the queue)."""
    sink = Sink()
    srv = server.Server(engine, sink, interval=0.0, batch=4)
    if on_message is not None:
        sink.write = _tap(sink.write, lambda: on_message(srv, sink))
    for line in lines:
        srv.handle_line(line)
    with srv._cond:
        srv._eof = True
    assert srv.run() == 0
    return sink.messages()


def _tap(write, after):
    def wrapped(b):
        write(b)
        after()
    return wrapped


def request(rid, seed, more, **settings):
    return protocol.encode(protocol.generate(rid, points_bytes(512, seed), 512, GREEDY | settings, more=more))


def per_request(msgs):
    out = {}
    for m in msgs:
        out.setdefault(m["id"], []).append(m)
    return out


def alone(engine, seed, **settings):
    from xspecmesh.decoding.engine import DecodeSettings

    pts = np.frombuffer(points_bytes(512, seed), "<f4").reshape(-1, 6)
    return engine.generate(pts, DecodeSettings.from_dict(GREEDY | settings)).triangles


def test_a_held_collection_decodes_in_one_batch_with_each_result_as_alone(engine):
    lines = [request("a", 1, True), request("b", 2, True, max_tokens=60), request("c", 3, False, max_faces=3)]
    got = per_request(serve(engine, lines))
    for rid, seed, extra in (("a", 1, {}), ("b", 2, {"max_tokens": 60}), ("c", 3, {"max_faces": 3})):
        msgs = got[rid]
        assert [m["type"] for m in msgs][-1] == "done" and sum(m["type"] == "done" for m in msgs) == 1
        assert msgs[-1]["stats"]["batch"] == 3 and not msgs[-1]["cancelled"]
        tris = [t for m in msgs if m["type"] == "faces" for t in m["triangles"]]
        np.testing.assert_allclose(np.asarray(tris, np.float32).reshape(-1, 3, 3), alone(engine, seed, **extra))
    assert len([t for m in got["c"] if m["type"] == "faces" for t in m["triangles"]]) == 3


def test_other_settings_wait_for_their_own_batch(engine):
    msgs = serve(engine, [request("a", 1, True), request("x", 2, True, mode="ar"), request("b", 3, False)])
    done = {m["id"]: m for m in msgs if m["type"] == "done"}
    assert done["a"]["stats"]["batch"] == done["b"]["stats"]["batch"] == 2
    assert "batch" not in done["x"]["stats"]  # alone: the single-object path
    order = [m["id"] for m in msgs if m["type"] == "done"]
    assert order.index("x") == 2


def test_cancelling_one_request_of_a_batch_keeps_the_others(engine):
    cancelled = threading.Event()

    def on_message(srv, sink):
        if not cancelled.is_set() and any(m["type"] == "faces" and m["id"] == "b" for m in sink.messages()):
            cancelled.set()
            srv.handle_line(protocol.encode(protocol.cancel("b")))

    got = per_request(serve(engine, [request("a", 1, True), request("b", 2, True), request("c", 3, False)],
                            on_message))
    assert got["b"][-1]["type"] == "done" and got["b"][-1]["cancelled"]
    b_faces = sum(len(m["triangles"]) for m in got["b"] if m["type"] == "faces")
    assert 0 < b_faces < len(alone(engine, 2))
    for rid, seed in (("a", 1), ("c", 3)):
        assert not got[rid][-1]["cancelled"]
        tris = [t for m in got[rid] if m["type"] == "faces" for t in m["triangles"]]
        np.testing.assert_allclose(np.asarray(tris, np.float32).reshape(-1, 3, 3), alone(engine, seed))


def test_more_must_be_a_boolean():
    msg = protocol.generate("a", points_bytes(512), 512, {}) | {"more": "yes"}
    with pytest.raises(protocol.ProtocolError, match="more"):
        protocol.read_request(protocol.encode(msg))


def test_a_refused_last_request_still_releases_the_held_ones(engine):
    sink = Sink()
    srv = server.Server(engine, sink, interval=0.0, batch=4)
    worker = threading.Thread(target=srv.run, daemon=True)
    worker.start()
    try:
        srv.handle_line(request("a", 1, True))
        srv.handle_line(protocol.encode(protocol.generate("z", points_bytes(512), 512, GREEDY | {"heads": 99})))
        sink.wait_for(lambda m: m["type"] == "done" and m["id"] == "a", timeout=60)  # no end of input needed
    finally:
        srv.shutdown()
        worker.join(10)
    assert [m["type"] for m in sink.messages() if m["id"] == "z"] == ["error"]
