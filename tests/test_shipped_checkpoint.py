"""The shipped default checkpoint: present, small enough to commit, the documented shape, and what every command
loads when none is named."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

from xspecmesh.model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint

BOX = Path(__file__).parent / "data" / "reference" / "meshes" / "box.obj"
PAPER_HEADS = DEFAULT_CHECKPOINT.with_name("paper_heads.safetensors")


def test_it_is_committed_fp16_and_at_most_25_mb():
    assert DEFAULT_CHECKPOINT.is_file(), "backend/xspecmesh/weights/default.safetensors is missing"
    assert DEFAULT_CHECKPOINT.stat().st_size <= 25 * 2**20
    with safe_open(str(DEFAULT_CHECKPOINT), "pt") as f:
        assert f.metadata()["dtype"] == "float16"
        assert all(f.get_slice(k).get_dtype() in ("F16", "I64") for k in f.keys())


def test_it_is_the_small_preset_with_a_four_draft_eagle_drafter():
    ck = load_checkpoint(DEFAULT_CHECKPOINT)
    assert ck.meta["preset"] == "small" and ck.model.cfg.dim == 256 and ck.model.cfg.depth == 6
    assert ck.heads is not None and ck.heads.num_heads == 4 and ck.heads.cfg.kind == "eagle"
    assert ck.meta.get("families") and ck.meta.get("max_faces")  # what it was trained on, for the benchmarks


def test_the_papers_heads_are_one_flag_away_on_the_same_backbone():
    """--checkpoint backend/xspecmesh/weights/paper_heads.safetensors: the shipped backbone with the paper's heads."""
    import torch

    paper, shipped = load_checkpoint(PAPER_HEADS), load_checkpoint(DEFAULT_CHECKPOINT)
    assert paper.heads.cfg.kind == "cross" and paper.heads.num_heads == 4
    a, b = paper.model.state_dict(), shipped.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_generate_uses_it_by_default(tmp_path):
    out = tmp_path / "o.obj"
    r = subprocess.run([sys.executable, "-m", "xspecmesh", "generate", str(BOX), "-o", str(out), "--max-tokens", "40",
                        "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert Path(stats["checkpoint"]).resolve() == DEFAULT_CHECKPOINT.resolve()
    assert stats["faces"] >= 1 and out.exists()


def test_fit_puts_the_shipped_models_box_on_the_input_box(tmp_path):
    """End to end: the shipped model closes a box (EOS), and --fit moves its vertices onto the input's surface."""
    import numpy as np
    import trimesh

    box = trimesh.load(BOX, force="mesh")
    results = {}
    for fit in ("", "--fit"):
        out = tmp_path / f"o{fit}.obj"
        r = subprocess.run([sys.executable, "-m", "xspecmesh", "generate", str(BOX), "-o", str(out), "--mode", "ar",
                            "--json", *([fit] if fit else [])], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        results[fit] = json.loads(r.stdout), trimesh.load(out, force="mesh", process=False)
    (plain, raw), (stats, fitted) = results[""], results["--fit"]
    assert stats["complete"] and stats["sequence_sha256"] == plain["sequence_sha256"]
    assert stats["fit_distance_after"] < stats["fit_distance_before"]
    assert np.array_equal(raw.faces, fitted.faces)
    err = np.abs(fitted.bounds - box.bounds).max() / box.extents.max()
    assert err < 0.01, (fitted.bounds, box.bounds)  # within 1% of the box's size
