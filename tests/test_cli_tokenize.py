"""`xspecmesh tokenize` / `xspecmesh detokenize` on the reference meshes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from xspecmesh import cli
from xspecmesh.geometry.mesh import load_mesh
from xspecmesh.geometry.tokenizer import decode

REF = Path(__file__).parent / "data" / "reference"
NAMES = sorted(p.stem for p in (REF / "bpt_tokens").glob("*.json"))


def expected(name: str) -> dict:
    return json.loads((REF / "bpt_tokens" / f"{name}.json").read_text())


def test_tokenize_json_matches_reference(capsys):
    paths = [str(REF / "meshes" / f"{name}.obj") for name in NAMES]
    assert cli.main(["tokenize", "--json", *paths]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(NAMES)
    for name, path, line in zip(NAMES, paths, lines):
        row = json.loads(line)
        assert row["path"] == path and row["tokens"] == expected(name)["tokens"]
        assert row["faces"] == len(expected(name)["processed_faces"])


def test_tokenize_summary(capsys):
    assert cli.main(["tokenize", str(REF / "meshes" / "icosphere2.obj")]) == 0
    out = capsys.readouterr().out
    assert "320 faces" in out and "894 tokens" in out and "31.0% of 9 per face" in out


def test_detokenize_list_and_object(tmp_path, capsys):
    ref = expected("torus")
    for i, payload in enumerate([ref["tokens"], {"path": "x", "tokens": ref["tokens"] + [5120]}]):
        src, out = tmp_path / f"t{i}.json", tmp_path / f"t{i}.obj"
        src.write_text(json.dumps(payload))
        assert cli.main(["detokenize", str(src), "-o", str(out)]) == 0
        mesh = load_mesh(out, process=False)
        assert len(mesh.faces) == len(ref["decoded_triangles_quantized"])
        tris = np.round((mesh.vertices[mesh.faces] + 1) / 2 * 128 - 0.5).astype(int)
        np.testing.assert_array_equal(tris, decode(ref["tokens"]))
    assert "256 faces" in capsys.readouterr().out


def test_errors_are_one_line_exit_2(tmp_path, capsys):
    assert cli.main(["tokenize", str(tmp_path / "missing.obj")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file" in err
    bad = tmp_path / "bad.json"
    bad.write_text('{"tokens": "nope"}')
    assert cli.main(["detokenize", str(bad), "-o", str(tmp_path / "o.obj")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    bad.write_text("[5120]")
    assert cli.main(["detokenize", str(bad), "-o", str(tmp_path / "o.obj")]) == 2
    assert "no faces" in capsys.readouterr().err


def test_console_entry_point():
    box = REF / "meshes" / "box.obj"
    run = subprocess.run([sys.executable, "-m", "xspecmesh", "tokenize", "--json", str(box)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["tokens"] == expected("box")["tokens"]


def test_a_closed_pipe_ends_quietly():
    """`xspecmesh tokenize ... | head`: the reader leaves early; no traceback, exit code 141 as `yes | head`."""
    paths = [str(REF / "meshes" / f"{name}.obj") for name in NAMES] * 40
    proc = subprocess.Popen([sys.executable, "-m", "xspecmesh", "tokenize", "--json", *paths],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(100)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err
