"""tools/drafter_agreement.py: per-draft agreement, draft 1's split by the backbone's token class and where it is
confident, tiny models."""
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_heads, tiny_model
from xspecmesh.model.checkpoint import load_checkpoint, save_checkpoint
from xspecmesh.training.data import ShapeConfig, validation_pairs
from xspecmesh.training.trainer import collate

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


def test_held_out_shapes_are_the_ones_the_benchmark_draws(tmp_path):
    """The checkpoint's whole training distribution (here all 24 quarter-turn poses), not a default narrower one."""
    model = tiny_model()
    meta = {"families": "box", "max_faces": 12, "axis_aligned": True, "axis_turns": 24}
    path = save_checkpoint(tmp_path / "m.safetensors", model, None, dtype="float32", meta=meta)
    _, (inputs, _), _ = next(drafter_agreement.held_out_batches(load_checkpoint(path), count=4))

    def true_inputs(shapes):
        return collate(validation_pairs(4, config=shapes, num_points=model.cfg.encoder.num_points))[0]

    assert torch.equal(inputs, true_inputs(ShapeConfig.trained_on(meta)))
    assert not torch.equal(inputs, true_inputs(ShapeConfig.trained_on({**meta, "axis_turns": 4})))
