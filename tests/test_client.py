"""The add-on's BackendClient: against a torch-free stand-in backend (process handling, fast), then against the real
`xspecmesh serve` with a tiny random checkpoint (streaming order, cancel, back-to-back requests, a killed backend,
and the client running on Python 3.13)."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from addon_modules import addon_module

ROOT = Path(__file__).resolve().parents[1]
ADDON = ROOT / "xspecmesh_addon"

client_mod = addon_module("core.client")
BackendClient, BackendError = client_mod.BackendClient, client_mod.BackendError


def points(n: int = 512, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xyz = rng.uniform(-0.9, 0.9, (n, 3))
    nrm = rng.normal(size=(n, 3))
    return np.concatenate([xyz, nrm / np.linalg.norm(nrm, axis=1, keepdims=True)], 1).astype(np.float32)


def collect(client, until, timeout: float = 120.0) -> list[dict]:
    """Poll until a message satisfies `until`; every message so far is returned."""
    msgs: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msgs += client.poll(timeout=0.1)
        if any(until(m) for m in msgs):
            return msgs
    raise AssertionError(f"timed out; last messages {msgs[-3:]}")


# ------------------------------------------------------------------------------------------------ stand-in backend

FAKE_MAIN = textwrap.dedent(r'''
    import base64, json, os, sys, time
    mode = os.environ.get("FAKE_MODE", "ok")
    def send(m):
        sys.stdout.write(json.dumps(m) + "\n"); sys.stdout.flush()
    print("fake backend starting", file=sys.stderr, flush=True)
    if mode == "fail":
        print("fatal: cannot load anything", file=sys.stderr, flush=True)
        sys.exit(3)
    if mode == "silent":
        time.sleep(60)
    send({"type": "hello", "id": None, "protocol": 1, "version": "fake", "device": "cpu", "heads": 4,
          "argv": sys.argv[1:], "cwd": os.getcwd(), "pythonpath": os.environ.get("PYTHONPATH")})
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["type"] == "shutdown" and mode != "stubborn":
            break
        rid = msg.get("id")
        if rid == "die":
            print("backend fell over", file=sys.stderr, flush=True)
            os._exit(7)
        if rid == "junk":
            sys.stdout.write("this is not json\n"); sys.stdout.flush()
        elif msg["type"] == "generate":
            send({"type": "faces", "id": rid, "triangles": [[[0, 0, 0], [1, 0, 0], [0, 1, 0]]]})
            send({"type": "done", "id": rid, "cancelled": False,
                  "stats": {"count": msg["count"], "bytes": len(base64.b64decode(msg["points"]))}})
    if mode == "stubborn":  # ignores shutdown and end of input
        time.sleep(60)
''')


@pytest.fixture
def fake_backend(tmp_path):
    pkg = tmp_path / "bundle" / "xspecmesh"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(FAKE_MAIN)
    return str(tmp_path / "bundle")


def test_missing_interpreter_is_a_clear_error():
    with pytest.raises(BackendError, match="backend Python not found"):
        BackendClient("/no/such/python3").start()


def test_interpreter_without_the_backend_package_is_a_clear_error():
    python = shutil.which("python3.11", path="/usr/bin") or shutil.which("python3", path="/usr/bin")
    probe = subprocess.run([python, "-c", "import xspecmesh"], capture_output=True) if python else None
    if probe is None or probe.returncode == 0:
        pytest.skip("no system Python without xspecmesh")
    client = BackendClient(python)
    with pytest.raises(BackendError, match="cannot import the xspecmesh backend package"):
        client.start(timeout=30)
    assert not client.alive


def test_environment_is_cleaned_and_backend_path_is_exact(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/somewhere/blender")
    monkeypatch.setenv("PYTHONHOME", "/blender/python")
    env = BackendClient("python3").environment()
    assert "PYTHONPATH" not in env and "PYTHONHOME" not in env and env["PYTHONUNBUFFERED"] == "1"
    assert BackendClient("python3", backend_path="/ext/backend").environment()["PYTHONPATH"] == "/ext/backend"
    cmd = BackendClient("py", checkpoint="/m.safetensors", device="cpu").command()
    assert cmd == ["py", "-u", "-m", "xspecmesh", "serve", "--device", "cpu", "--checkpoint", "/m.safetensors"]


def test_stand_in_backend_round_trip(fake_backend, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/must/not/leak")
    with BackendClient(sys.executable, checkpoint="c.safetensors", backend_path=fake_backend) as client:
        hello = client.start(timeout=30)
        assert hello["pythonpath"] == fake_backend and hello["argv"][-2:] == ["--checkpoint", "c.safetensors"]
        assert Path(hello["cwd"]).name.startswith("xspecmesh-")
        pts = points(600)
        client.generate("a", memoryview(pts), 600, {"heads": 4})
        client.generate("b", pts.tobytes(), 600, {})
        msgs = collect(client, lambda m: m["id"] == "b" and m["type"] == "done")
        assert [(m["type"], m["id"]) for m in msgs] == [("faces", "a"), ("done", "a"), ("faces", "b"), ("done", "b")]
        assert msgs[1]["stats"] == {"count": 600, "bytes": 600 * 24}
        client.generate("junk", pts, 600, {})
        bad = collect(client, lambda m: m["type"] == "error")
        assert "backend wrote an invalid line" in bad[-1]["message"]
        proc = client._proc
    assert proc.returncode == 0 and not client.alive and client._tmpdir is None


def test_backend_dying_mid_run_gives_an_error_not_a_hang(fake_backend):
    client = BackendClient(sys.executable, backend_path=fake_backend)
    client.start(timeout=30)
    client.generate("die", points(), 512, {})
    msgs = collect(client, lambda m: m["type"] == "error", timeout=10)
    assert msgs[-1]["id"] is None
    assert msgs[-1]["message"].startswith("backend exited unexpectedly (code 7)")
    assert "backend fell over" in msgs[-1]["message"]
    assert not client.alive
    with pytest.raises(BackendError, match="not running"):
        client.cancel("die")
    client.close()


def test_start_failures_carry_the_backend_reason(fake_backend, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "fail")
    client = BackendClient(sys.executable, backend_path=fake_backend)
    with pytest.raises(BackendError, match="(?s)code 3.*cannot load anything"):
        client.start(timeout=30)
    monkeypatch.setenv("FAKE_MODE", "silent")
    client = BackendClient(sys.executable, backend_path=fake_backend)
    with pytest.raises(BackendError, match="no answer within 0.5 s"):
        client.start(timeout=0.5)
    assert client._proc.returncode is not None  # reaped


def test_close_terminates_a_backend_that_ignores_shutdown(fake_backend, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "stubborn")
    client = BackendClient(sys.executable, backend_path=fake_backend)
    client.start(timeout=30)
    client.close(timeout=0.2)
    assert client._proc.returncode is not None and not client.alive


# ------------------------------------------------------------------------------------------------ the real backend


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from xspecmesh.model.checkpoint import write_random_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    write_random_checkpoint(str(path), "tiny", heads=4, seed=0)
    return str(path)


@pytest.fixture(scope="module")
def live(checkpoint):
    with pytest.MonkeyPatch.context() as mp:  # one torch thread: the test machines have 2 shared cores
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("MKL_NUM_THREADS", "1")
        client = BackendClient(sys.executable, checkpoint=checkpoint, device="cpu")
        client.start(timeout=120)
    yield client
    client.close()


LONG = {"mode": "spec", "heads": 4, "delta": 0.0, "accept": "threshold", "max_tokens": 4000, "seed": 3}
SHORT = {"mode": "spec", "heads": 4, "delta": 0.0, "accept": "threshold", "max_tokens": 60, "seed": 1}


def test_hello_describes_the_backend(live, checkpoint):
    hello = live.hello
    assert hello["protocol"] == 1 and hello["heads"] == 4 and hello["device"] == "cpu"
    assert hello["version"] and hello["torch"] and hello["checkpoint"]


def test_two_requests_stream_faces_then_done_in_order(live):
    live.generate("one", points(seed=1), 512, SHORT)
    live.generate("two", points(2048, seed=2), 2048, {**SHORT, "mode": "ar"})
    msgs = collect(live, lambda m: m["id"] == "two" and m["type"] in ("done", "error"))
    assert all(m["type"] in ("progress", "faces", "done") for m in msgs), msgs[-1]
    ids = [m["id"] for m in msgs]
    assert ids == sorted(ids, key=["one", "two"].index)  # "one" finishes before "two" starts
    for rid in ("one", "two"):
        mine = [m for m in msgs if m["id"] == rid]
        assert mine[-1]["type"] == "done" and not mine[-1]["cancelled"]
        streamed = sum(len(m["triangles"]) for m in mine if m["type"] == "faces")
        assert streamed > 0 and [m["type"] for m in mine].index("faces") < len(mine) - 1
        assert mine[-1]["stats"]["tokens"] > 0


def test_cancel_mid_run(live):
    live.generate("long", points(seed=4), 512, LONG)
    collect(live, lambda m: m["id"] == "long" and m["type"] == "progress")
    live.cancel("long")
    msgs = collect(live, lambda m: m["id"] == "long" and m["type"] in ("done", "error"))
    assert msgs[-1]["type"] == "done" and msgs[-1]["cancelled"] is True
    assert msgs[-1]["stats"]["tokens"] < LONG["max_tokens"]


def _python313() -> str | None:
    candidates = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.13*/bin/python3.13")))
    for python in [*candidates, shutil.which("python3.13")]:
        if python and subprocess.run([python, "-c", "pass"], capture_output=True).returncode == 0:
            return python
    return None


PY313 = _python313()


@pytest.mark.skipif(not PY313, reason="no Python 3.13 here")
def test_client_runs_on_python_313(fake_backend):
    """The client under Python 3.13 (Blender's next Python) against the stand-in backend run by this Python."""
    script = textwrap.dedent(f"""
        import array, json, sys, time, types
        pkg = types.ModuleType("addon"); pkg.__path__ = [{str(ADDON / "core")!r}]; sys.modules["addon"] = pkg
        from addon.client import BackendClient
        pts = array.array("f", [0.5] * (512 * 6))
        with BackendClient({sys.executable!r}, backend_path={fake_backend!r}) as c:
            c.start(timeout=60)
            c.generate("x", memoryview(pts), 512, {{"seed": 0}})
            msgs, t0 = [], time.monotonic()
            while not any(m["type"] == "done" for m in msgs) and time.monotonic() - t0 < 30:
                msgs += c.poll(timeout=0.1)
        print(json.dumps([sys.version_info[:2], [m["type"] for m in msgs], c.alive]))
    """)
    proc = subprocess.run([PY313, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == [[3, 13], ["faces", "done"], False]


def test_backend_killed_mid_run(live):
    """Last in this module on purpose: it kills the shared backend."""
    live.generate("k", points(seed=5), 512, LONG)
    collect(live, lambda m: m["id"] == "k" and m["type"] == "progress")
    live._proc.kill()
    msgs = collect(live, lambda m: m["type"] == "error", timeout=15)
    assert msgs[-1]["id"] is None and msgs[-1]["message"].startswith("backend exited unexpectedly (code -9)")
    assert not live.alive
    with pytest.raises(BackendError, match="not running"):
        live.generate("after", points(), 512, SHORT)
