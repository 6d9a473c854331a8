"""Shared fixtures: tiny models built in milliseconds."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # also for the servers and CLIs the tests start

import pytest
import torch

from xspecmesh.model.config import HeadsConfig, preset
from xspecmesh.model.drafter import DECODER_KINDS, Drafter, build_drafter
from xspecmesh.model.transformer import MeshTransformer

torch.set_num_threads(1)  # tiny models: threads only add synchronisation (and CI has 2 cores)


def tiny_model(seed: int = 0, sharpen: float = 1.0) -> MeshTransformer:
    """A random `tiny` backbone; `sharpen` scales the output layer so its distributions are peaky, not uniform."""
    torch.manual_seed(seed)
    model = MeshTransformer(preset("tiny")).eval()
    with torch.no_grad():
        model.to_logits.weight.mul_(sharpen)
    return model


def tiny_heads(model: MeshTransformer, d: int = 4, kind: str = "cross", seed: int = 1, output: str = "shared",
               **cfg) -> Drafter:
    """A random drafter (`cfg`: more HeadsConfig fields); a draft decoder's weights are all drawn at random (its
    zero-started branches would otherwise make it ignore the tokens, the history and the taps the tests are about)."""
    torch.manual_seed(seed)
    drafter = build_drafter(model.cfg, HeadsConfig(num_heads=d, kind=kind, output=output, **cfg)).eval()
    if kind in DECODER_KINDS:
        with torch.no_grad():
            for p in drafter.parameters():
                p.normal_(0.0, 0.3)
    return drafter


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture
def cond(model):
    torch.manual_seed(5)
    with torch.no_grad():
        return model.encode(torch.randn(2, model.cfg.encoder.num_points, 6))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("XSPECMESH_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow; set XSPECMESH_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
