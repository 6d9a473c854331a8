"""tools/drafter_agreement.py: per-draft agreement, draft 1's split by the backbone's token class and where it is
confident, tiny models."""
import sys
from pathlib import Path

import pytest

from conftest import tiny_heads, tiny_model
from xspecmesh.model.checkpoint import save_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import drafter_agreement  # noqa: E402


@pytest.mark.parametrize("kind,output", [("cross", "shared"), ("eagle", "factored")])
def test_draft1_by_class_adds_up_to_draft1(tmp_path, kind, output):
    model = tiny_model(sharpen=30.0)  # (peaky enough that some positions are confident)
    path = save_checkpoint(tmp_path / "m.safetensors", model, tiny_heads(model, 2, kind, output=output),
                           dtype="float32", meta={"families": "box", "max_faces": 12})
    row = drafter_agreement.agreement(str(path), count=3)  # one batch: its agreement is hits over positions
    for name in ("truth", "samples"):
        split = row[f"{name}_draft1_by_class"]
        assert list(split) == list(drafter_agreement.CLASSES)
        positions = sum(c["positions"] for c in split.values())
        hits = sum(c["agreement"] * c["positions"] for c in split.values() if c["positions"])
        assert positions > 0 and hits / positions == pytest.approx(row[name][0], abs=1e-3)
        assert all(c["agreement"] is None if c["positions"] == 0 else 0 <= c["agreement"] <= 1 for c in split.values())
        sure = row[f"{name}_draft1_confident"]  # a subset of the same positions (a sharpened model is confident)
        assert 0 < sure["positions"] <= positions and 0 <= sure["agreement"] <= 1
