"""The shared protocol module: one canonical file, byte-identical in the add-on, standard library only."""
from __future__ import annotations

import array
import ast
import base64
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from addon_modules import addon_module

from xspecmesh.serving import protocol

ROOT = Path(__file__).resolve().parents[1]
ADDON = ROOT / "xspecmesh_addon"


def points_bytes(n: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return rng.uniform(-0.9, 0.9, (n, 6)).astype("<f4").tobytes()


def test_addon_copy_is_byte_identical():
    canonical = (ROOT / "backend/xspecmesh/serving/protocol.py").read_bytes()
    assert (ADDON / "core" / "protocol.py").read_bytes() == canonical, (
        "xspecmesh_addon/core/protocol.py differs from the canonical backend/xspecmesh/serving/protocol.py; "
        "run: cp backend/xspecmesh/serving/protocol.py xspecmesh_addon/core/protocol.py")


@pytest.mark.parametrize("name", ["core/protocol.py", "core/client.py", "core/settings_schema.py"])
def test_addon_side_modules_use_only_stdlib_and_relative_imports(name):
    tree = ast.parse((ADDON / name).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: fine
                continue
            roots = [node.module.split(".")[0]]
        else:
            continue
        for root in roots:
            assert root in sys.stdlib_module_names or root == "__future__", f"{name} imports {root}"


def test_generate_round_trip_accepts_bytes_memoryview_and_array():
    raw = points_bytes(512)
    arr = np.frombuffer(raw, dtype="<f4").reshape(512, 6)
    strided = np.zeros((512, 12), np.float32)
    strided[:, ::2] = arr
    for points in (raw, memoryview(arr), array.array("f", raw), strided[:, ::2]):
        msg = protocol.generate("a1", points, 512, {"mode": "spec", "heads": 4})
        line = protocol.encode(msg)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        req = protocol.read_request(line)
        assert req["id"] == "a1" and req["count"] == 512 and req["settings"] == {"mode": "spec", "heads": 4}
        assert req["points"] == raw


def _gen_line(**fields) -> bytes:
    msg = {"type": "generate", "id": "r", "points": base64.b64encode(points_bytes(512)).decode(), "count": 512,
           "settings": {}}
    msg.update(fields)
    return json.dumps(msg).encode()


@pytest.mark.parametrize("line, fragment, rid", [
    (b"not json", "not valid JSON", None),
    (b"\xff\xfe{}", "not UTF-8", None),
    (b"[1, 2]", "JSON object", None),
    (b'{"id": "x"}', '"type"', "x"),
    (b'{"type": "explode", "id": "x"}', "unknown request type", "x"),
    (b'{"type": "cancel"}', '"id"', None),
    (b'{"type": "cancel", "id": 7}', '"id"', None),
    (b'{"type": "generate", "id": "g", "count": NaN}', "not valid JSON", None),
    (_gen_line(count="512"), '"count" must be an integer', "r"),
    (_gen_line(count=True), '"count" must be an integer', "r"),
    (_gen_line(count=16, points=base64.b64encode(points_bytes(16)).decode()), "between 512 and 200000", "r"),
    (_gen_line(count=513), '"count" says 513', "r"),
    (_gen_line(points="***"), "base64", "r"),
    (_gen_line(points=[1, 2]), "base64 string", "r"),
    (_gen_line(settings=[1]), '"settings" must be an object', "r"),
])
def test_bad_requests_raise_clear_errors(line, fragment, rid):
    with pytest.raises(protocol.ProtocolError) as info:
        protocol.read_request(line)
    assert fragment in str(info.value)
    assert info.value.request_id == rid


def test_constructors_check_their_input():
    with pytest.raises(protocol.ProtocolError, match="count 600 needs"):
        protocol.generate("a", points_bytes(512), 600, {})
    with pytest.raises(protocol.ProtocolError, match="must be float32, got a buffer of format 'd'"):
        protocol.generate("a", np.zeros((512, 6)), 512, {})
    with pytest.raises(protocol.ProtocolError, match='"id"'):
        protocol.cancel("")
    with pytest.raises(ValueError):
        protocol.encode({"x": math.nan})


def test_replies_are_plain_json_and_validate():
    stats = {"tokens": np.int64(12), "scr": np.float32(1.5), "seconds": math.inf, "list": (1, 2)}
    msgs = [
        protocol.hello({"version": "0", "device": "cpu", "heads": 4, "type": "bogus"}),
        protocol.progress("a", stats),
        protocol.faces("a", np.zeros((2, 3, 3), np.float32).tolist()),
        protocol.done("a", stats, cancelled=True),
        protocol.done("a", stats, fitted=np.ones((2, 3, 3), np.float32).tolist()),
        protocol.error(None, "boom"),
    ]
    for msg in msgs:
        again = json.loads(protocol.encode(msg))
        assert protocol.validate_reply(again) == again
    assert msgs[0]["type"] == "hello" and msgs[0]["protocol"] == protocol.PROTOCOL_VERSION
    assert msgs[1]["tokens"] == 12 and msgs[1]["scr"] == 1.5 and msgs[1]["seconds"] is None
    assert msgs[3]["stats"]["list"] == [1, 2] and msgs[3]["cancelled"] is True and "fitted" not in msgs[3]
    assert len(msgs[4]["fitted"]) == 2


@pytest.mark.parametrize("msg", [
    {"type": "hello", "id": None, "protocol": 99},
    {"type": "faces", "id": "a", "triangles": [[[0, 0], [0, 0, 0], [0, 0, 0]]]},
    {"type": "faces", "id": None, "triangles": []},
    {"type": "done", "id": "a", "stats": {}},
    {"type": "done", "id": "a", "cancelled": False, "stats": {}, "fitted": [[1, 2, 3]]},
    {"type": "error", "id": 3, "message": "x"},
    {"type": "what", "id": None},
])
def test_bad_replies_are_refused(msg):
    with pytest.raises(protocol.ProtocolError):
        protocol.validate_reply(msg)


def test_addon_copy_imports_standalone():
    mod = addon_module("core.protocol")
    assert mod.PROTOCOL_VERSION == protocol.PROTOCOL_VERSION
    assert mod.read_request(protocol.encode(protocol.cancel("z")))["id"] == "z"
