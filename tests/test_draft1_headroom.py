"""tools/draft1_headroom.py: the history lookup, and the probe that starts as the drafter's own output, tiny models."""
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_heads, tiny_model
from xspecmesh.model.checkpoint import load_checkpoint, save_checkpoint
from xspecmesh.model.drafter import factored_logits
from xspecmesh.training import sample_file
from xspecmesh.training.data import ShapeConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import draft1_headroom  # noqa: E402


def test_lookup_finds_the_token_after_the_last_earlier_occurrence():
    seq = [5, 7, 9, 5, 7, 2, 5, 7]
    assert draft1_headroom.lookup(seq, 3, 1) == 7  # ...5 | before: 5 at 0, then 7
    assert draft1_headroom.lookup(seq, 6, 1) == 7  # the last earlier 5 (at 3), then 7
    assert draft1_headroom.lookup(seq, 7, 2) == 2  # 5 7: last at 3..4, then 2
    assert draft1_headroom.lookup(seq, 5, 2) is None  # 7 2 never came before
    assert draft1_headroom.lookup(seq, 0, 1) is None  # no history


@pytest.mark.parametrize("output", ["factored", "shared"])
def test_the_probe_head_starts_as_the_drafters_own_output(output):
    model = tiny_model()
    drafter = tiny_heads(model, 2, "eagle", output=output)
    weight, bias = draft1_headroom._own_output(model, drafter)
    feature = torch.randn(5, model.cfg.dim)
    with torch.no_grad():
        own = drafter.outputs(model, feature)
        own = factored_logits(own) if drafter.factored else own
        assert torch.allclose(feature @ weight.T + bias, own[:, draft1_headroom.BLOCKS], atol=1e-4)


@pytest.mark.parametrize("layers", [False, True])
def test_the_probe_starts_at_draft_1_and_the_lookup_counts_nest(tmp_path, layers):
    model = tiny_model(sharpen=30.0)  # (peaky enough that some positions are confident)
    drafter = tiny_heads(model, 2, "eagle", output="factored", taps=(1,))
    path = save_checkpoint(tmp_path / "m.safetensors", model, drafter, dtype="float32",
                           meta={"families": "box", "max_faces": 12})
    pool = tmp_path / "own.safetensors"
    sample_file.write(pool, load_checkpoint(path).model, ShapeConfig.parse("box", max_faces=12), count=6, seed=3, max_tokens=36,
                      batch=3)
    row = draft1_headroom.headroom(str(path), count=4, pool=str(pool), layers=layers, epochs=1)
    assert row["confident_positions"] > 0
    assert sum(c["positions"] for c in row["draft1_by_class"].values()) == row["confident_positions"]
    for n, v in row["lookup"].items():
        assert 0 <= v["adds"] <= v["right"] <= v["matched"] <= 1, n
    probe = row["probe"]
    assert probe["features"] == ("drafter + backbone layers" if layers else "drafter")
    assert probe["train_positions"] > 0 and len(probe["epochs"]) == 2
    # Before fitting, the head is the drafter's own output: it picks what draft 1 picks.
    assert probe["epochs"][0]["all"] == pytest.approx(row["draft1"], abs=1e-4)
