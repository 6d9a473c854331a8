"""The demo (`python3 build.py demo`, tools/demo.py): its pipeline end to end with a tiny random checkpoint, and its
one clear message when no checkpoint is installed."""
from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
try:
    import demo
finally:
    sys.path.pop(0)


def test_demo_without_a_checkpoint_says_so(tmp_path, capsys):
    with pytest.raises(demo.DemoError, match="no checkpoint is installed .* pass --checkpoint PATH"):
        demo.resolve_checkpoint(None, default=tmp_path / "default.safetensors")
    assert demo.main(["--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.blender
@pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="bpy is not installed")
def test_demo_pipeline_with_a_tiny_checkpoint(tmp_path):
    from xspecmesh.model.checkpoint import write_random_checkpoint

    checkpoint = tmp_path / "tiny.safetensors"
    write_random_checkpoint(checkpoint, heads=4, seed=0)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "demo.py"), "--checkpoint", str(checkpoint),
                           "--out", str(out), "--max-faces", "6", "--width", "320", "--device", "cpu"],
                          capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "speedup" in proc.stdout and "XSpecMesh D=4" in proc.stdout

    report = json.loads((out / "demo.json").read_text())
    ar, spec, adaptive = report["rows"]
    assert (ar["mode"], spec["mode"], adaptive["mode"]) == ("AR", "XSpecMesh", "XSpecMesh adaptive")
    for row in (ar, spec, adaptive):
        assert 0 < row["faces"] <= 6 and row["seconds"] > 0 and row["scr"] >= 1.0
        assert row["cd"] > 0 and not row["failed"]
        assert "limit" in row["fit_skipped"]  # Fit to Source is on (as in the add-on), but 6 faces is a cut mesh
    assert spec["heads"] == 4 and spec["delta"] == 0.5 and ar["speedup"] == 1.0
    assert adaptive["adaptive"] is True and spec["adaptive"] is False
    assert report["input_triangles"] > 1000  # a high-poly input

    png = (out / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (320, 160)
    obj = (out / "demo_retopo.obj").read_text()
    assert sum(line.startswith("f ") for line in obj.splitlines()) == spec["faces"]
    assert (out / "demo.blend").stat().st_size > 10_000


SAMPLE_CHECK = """
import json, sys
sys.path.insert(0, sys.argv[1])
import bpy, numpy as np, trimesh
import demo
found = {}
for kind in demo.SAMPLES:
    for obj in list(bpy.data.objects):
        bpy.data.objects.remove(obj)
    part = demo.make_sample(bpy, kind)
    mesh = part.evaluated_get(bpy.context.evaluated_depsgraph_get()).to_mesh()
    mesh.calc_loop_triangles()
    verts = np.array([tuple(v.co) for v in mesh.vertices])
    tris = trimesh.Trimesh(verts, np.array([tuple(t.vertices) for t in mesh.loop_triangles]))
    found[kind] = [len(tris.faces), bool(tris.is_watertight), int(tris.euler_number), tris.extents.tolist()]
print(json.dumps(found))
"""


@pytest.mark.blender
@pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="bpy is not installed")
def test_every_demo_sample_is_a_closed_high_poly_part():
    proc = subprocess.run([sys.executable, "-c", SAMPLE_CHECK, str(ROOT / "tools")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(found) == set(demo.SAMPLES)
    for kind, (faces, closed, euler, extents) in found.items():
        assert faces > 1000 and closed, kind
        assert euler == (0 if kind == "bracket" else 2), kind  # the bracket's hole goes through: genus 1
    assert found["bracket"][3] == pytest.approx([2.0, 1.2, 1.45], abs=0.05)  # base 2 x 1.2, flange up to 1.45
    assert found["cross"][3] == pytest.approx([2.0, 1.6, 0.4], abs=0.05)
