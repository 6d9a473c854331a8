"""tools/eval_families.py: the per-family figures, the pass rule and the contact sheet, with a tiny random model."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import trimesh

from xspecmesh.model.checkpoint import write_random_checkpoint

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import eval_families  # noqa: E402


def test_summary_applies_the_targets():
    row = dict(closed=True, cd=0.03, bbox_cd=0.05, faces=10, shape_faces=12)
    good = eval_families.summary([row] * 5)
    assert good["pass"] and good["cd_goal"] == 0.035 and good["faces_within_2x"] == 1.0 and good["on_target"] == 1
    box = dict(row, cd=0.05)  # the bounding box itself: closed, never on target
    far = dict(row, closed=False, cd=0.01)  # near but open
    assert eval_families.summary([row, box, far, box])["on_target"] == 0.25
    empty = dict(row, closed=False, cd=math.nan, faces=0)  # an empty result counts as infinitely far
    assert eval_families.summary([row, empty, empty])["cd_10k"] == math.inf
    too_many = eval_families.summary([dict(row, faces=30)] * 5)
    assert not too_many["pass"] and too_many["faces_ratio_median"] == 2.5


def test_tool_end_to_end(tmp_path):
    ckpt = write_random_checkpoint(tmp_path / "tiny.safetensors", "tiny", heads=0)
    meshes = tmp_path / "meshes"
    meshes.mkdir()
    trimesh.creation.box((1, 0.5, 0.3)).export(meshes / "brick.obj")
    out, sheet = tmp_path / "r.json", tmp_path / "sheet.png"
    assert eval_families.main(["--checkpoint", str(ckpt), "--count", "2", "--families", "wedge,nut",
                               "--meshes", str(meshes), "--max-tokens", "60", "--sheet", str(sheet),
                               "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["families"]) == ["wedge", "nut", "real meshes"]
    assert result["families"]["nut"]["count"] == 2 and result["families"]["real meshes"]["count"] == 1
    assert 0 <= result["overall_closed"] <= 1 and np.isfinite(result["families"]["wedge"]["bbox_cd_10k"])
    assert sheet.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
