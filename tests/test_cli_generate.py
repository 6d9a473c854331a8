"""`xspecmesh generate`: outputs in the input's frame, deterministic per seed, one-line errors with exit code 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh

from xspecmesh.model.checkpoint import write_random_checkpoint

REF = Path(__file__).parent / "data" / "reference" / "meshes"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(write_random_checkpoint(tmp_path_factory.mktemp("ck") / "tiny.safetensors", "tiny", heads=4))


def cli(*args):
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "xspecmesh", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_generate_mesh_json_and_determinism(ckpt, tmp_path):
    out = tmp_path / "o.obj"
    runs = []
    for mode in ("spec", "spec", "ar"):
        r = cli("generate", REF / "box.obj", "-o", out, "--checkpoint", ckpt, "--max-tokens", "150", "--json",
                "--mode", mode, "--accept", "greedy" if mode == "spec" else "threshold", "--temperature", "0")
        assert r.returncode == 0, r.stderr
        runs.append(json.loads(r.stdout))
    for key in ("faces", "vertices", "tokens", "steps", "scr", "seconds", "tokens_per_second", "mode", "heads",
                "delta", "accept", "device", "sequence_sha256"):
        assert key in runs[0]
    assert runs[0]["sequence_sha256"] == runs[1]["sequence_sha256"] == runs[2]["sequence_sha256"]  # greedy == AR
    r = cli("generate", REF / "box.obj", "-o", tmp_path / "a.obj", "--checkpoint", ckpt, "--max-tokens", "150",
            "--json", "--accept", "greedy", "--temperature", "0", "--adaptive")
    assert r.returncode == 0, r.stderr
    adaptive = json.loads(r.stdout)
    assert adaptive["adaptive"] is True and adaptive["sequence_sha256"] == runs[2]["sequence_sha256"]
    mesh = trimesh.load(out, force="mesh")
    box = trimesh.load(REF / "box.obj", force="mesh")
    # back in the input's frame: inside the cube that the normalization maps to [-1, 1]^3
    centre, half = box.bounds.mean(0), (box.extents.max() / 2) / 0.95
    assert np.all(np.abs(mesh.vertices - centre) <= half + 1e-3)
    assert np.abs(mesh.vertices - centre).max() > 0.1 * half


def test_fit_is_skipped_for_a_mesh_cut_at_the_token_limit(ckpt, tmp_path):
    runs = {}
    for fit in ("--no-fit", "--fit"):
        out = tmp_path / f"o{fit}.obj"
        r = cli("generate", REF / "box.obj", "-o", out, "--checkpoint", ckpt, "--max-tokens", "60", "--json",
                "--mode", "ar", "--seed", "2", fit)
        assert r.returncode == 0, r.stderr
        runs[fit] = json.loads(r.stdout), trimesh.load(out, force="mesh", process=False)
    (plain, a), (cut, b) = runs["--no-fit"], runs["--fit"]
    assert plain["complete"] is False and "fit_skipped" not in plain  # a random model never says EOS this soon
    assert "limit" in cut["fit_skipped"] and "fit_distance_after" not in cut
    assert np.array_equal(a.vertices, b.vertices) and np.array_equal(a.faces, b.faces)


def test_generate_from_point_cloud(ckpt, tmp_path):
    pts = np.random.default_rng(0).normal(size=(300, 6)).astype(np.float32) * 5 + 10
    np.save(tmp_path / "p.npy", pts)
    r = cli("generate", tmp_path / "p.npy", "-o", tmp_path / "o.ply", "--checkpoint", ckpt, "--max-tokens", "80",
            "--mode", "ar")
    assert r.returncode == 0, r.stderr
    assert trimesh.load(tmp_path / "o.ply").vertices.min() > 10 - 5 * 6


@pytest.mark.parametrize("case", ["shape", "nan", "missing", "corrupt", "delta", "preset_dir"])
def test_bad_input_is_one_line_and_exit_2(case, ckpt, tmp_path):
    inp, extra = REF / "box.obj", []
    if case == "shape":
        np.save(tmp_path / "p.npy", np.zeros((10, 4), np.float32))
        inp = tmp_path / "p.npy"
    elif case == "nan":
        a = np.ones((100, 6), np.float32)
        a[3, 1] = np.nan
        np.save(tmp_path / "p.npy", a)
        inp = tmp_path / "p.npy"
    elif case == "missing":
        inp = tmp_path / "none.obj"
    elif case == "corrupt":
        (tmp_path / "c.safetensors").write_bytes(b"nonsense")
        extra = ["--checkpoint", tmp_path / "c.safetensors"]
    elif case == "delta":
        extra = ["--delta", "1.5"]
    elif case == "preset_dir":
        extra = ["--checkpoint", tmp_path]
    r = cli("generate", inp, "-o", tmp_path / "o.obj", *(extra or ["--checkpoint", ckpt]))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xspecmesh: error:"), r.stderr
    assert "Traceback" not in r.stderr


def test_help_imports_no_heavy_library():
    # Building the parser (every sub-command's options, train's from TrainConfig) must not load torch & co.
    code = ("import sys; from xspecmesh.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'trimesh', 'scipy', 'manifold3d', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
