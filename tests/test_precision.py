"""Weight precision (xspecmesh/model/precision.py): int8 and the oneDNN fp32 linear on tiny models, the `auto` rule,
per-request precision in the engine and the `--precision` option. Nothing here asserts a timing."""
from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.ao.nn.quantized import dynamic

from conftest import tiny_heads, tiny_model
from xspecmesh.benchmarks import precision_check
from xspecmesh.cli import main
from xspecmesh.decoding.engine import DecodeSettings, Engine
from xspecmesh.errors import SettingsError
from xspecmesh.geometry import tokenizer as tok
from xspecmesh.model import precision
from xspecmesh.model.checkpoint import Checkpoint, save_checkpoint, write_random_checkpoint
from xspecmesh.model.config import HeadsConfig
from xspecmesh.model.heads import DraftHeads
from xspecmesh.training.data import TrainingPair


def peaked_model():
    """A tiny model as confident as a trained one: the token embedding dominates the residual stream and the output
    layer is that embedding, so it predicts its input token with a wide margin (random weights give near-uniform
    distributions whose top-1 any rounding flips)."""
    model = tiny_model()
    with torch.no_grad():
        model.token_embed.weight.mul_(20)
        model.to_logits.weight.copy_(model.token_embed.weight * 10)
    return model


def engine_at(model, heads, name: str) -> Engine:
    model, heads = copy.deepcopy(model), copy.deepcopy(heads)
    precision.apply(model, heads, name)
    return Engine(Checkpoint(model, heads, "test"), torch.device("cpu"), name)


def sequences(count: int, length: int, num_points: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [TrainingPair(np.asarray(rng.integers(0, 5120, length)), rng.normal(size=(num_points, 6)).astype(np.float32),
                         "random") for _ in range(count)]


def test_int8_quantizes_every_per_token_linear_of_backbone_and_drafter():
    model = tiny_model()
    heads = DraftHeads.for_backbone(model, HeadsConfig(num_heads=2, shared_output=False))
    precision.apply(model, heads, "int8")
    decoder_linears = 4 * model.cfg.depth + 2 * model.cfg.depth + 2 * model.cfg.depth + 1  # self q k v out, cross q
    per_mesh = precision.linear_counts(model.encoder)["float"] + 2 + 2 * model.cfg.depth  # out, ff, logits; cond k v
    assert precision.linear_counts(model) == {"float": per_mesh, "int8": decoder_linears}
    assert isinstance(heads.to_logits, dynamic.Linear)  # the drafter's own output layer, found by type
    assert torch.backends.quantized.engine in precision.INT8_ENGINES


def test_int8_leaves_a_draft_decoders_condition_keys_and_values_in_fp32():
    model = tiny_model()
    drafter = tiny_heads(model, d=2, kind="eagle")
    precision.apply(model, drafter, "int8")
    attn = drafter.block.cross_attn
    assert type(attn.to_k) is torch.nn.Linear and type(attn.to_v) is torch.nn.Linear  # once per mesh
    assert isinstance(attn.to_q, dynamic.Linear) and isinstance(drafter.fc, dynamic.Linear)  # once per token


def test_int8_without_a_quantized_engine_is_one_settings_error(monkeypatch):
    monkeypatch.setattr(precision, "INT8_ENGINES", ("no-such-engine",))
    with pytest.raises(SettingsError, match="no int8 CPU kernels"):
        precision.apply(tiny_model(), None, "int8")
    with pytest.raises(SettingsError, match="no int8 CPU kernels"):
        precision.resolve("int8", torch.device("cpu"))


def test_int8_keeps_the_top1_of_a_trained_like_model():
    """A model with peaked output distributions (as a trained one has) keeps its teacher-forced top-1 at int8."""
    model = peaked_model()
    heads = tiny_heads(model, d=2)
    pairs = sequences(4, 40, model.cfg.encoder.num_points)
    result = precision_check.agreement(engine_at(model, heads, "fp32"), engine_at(model, heads, "int8"), pairs)
    assert result["positions"] == 4 * 41
    assert result["agreement"] >= 0.99
    assert min(result["head_agreement"]) >= 0.99
    # ...and the check can tell: near-uniform distributions (random weights) do flip under int8
    flat = tiny_model()
    noisy = precision_check.agreement(engine_at(flat, None, "fp32"), engine_at(flat, None, "int8"), pairs)
    assert noisy["agreement"] < 0.99 and noisy["head_agreement"] is None


def test_onednn_linear_matches_aten_and_leaves_training_alone():
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 48)
    fast = copy.deepcopy(layer)
    fast.__class__ = precision.onednn_linear_class()
    x = torch.randn(2, 5, 32, requires_grad=True)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), layer(x), rtol=1e-5, atol=1e-5)
    fast(x).sum().backward()  # with grad: aten's path, differentiable
    assert x.grad is not None
    assert set(fast.state_dict()) == {"weight", "bias"}
    # the packed weight follows the weight, and a copy (an opaque oneDNN tensor cannot be copied) packs its own
    with torch.no_grad():
        fast.weight.mul_(2)
        layer.weight.mul_(2)
        torch.testing.assert_close(fast(x), layer(x), rtol=1e-5, atol=1e-5)
        twin = copy.deepcopy(fast)
        torch.testing.assert_close(twin(x), layer(x), rtol=1e-5, atol=1e-5)
    # a large layer takes oneDNN for one row too (an AR step), with the same result
    big = torch.nn.Linear(512, precision.ONE_ROW_ONEDNN // 512)
    fast_big = copy.deepcopy(big)
    fast_big.__class__ = precision.onednn_linear_class()
    one = torch.randn(1, 1, 512)
    with torch.no_grad():
        torch.testing.assert_close(fast_big(one), big(one), rtol=1e-4, atol=1e-4)
    assert "_packed" in fast_big.__dict__ or precision.onednn_linear_class() is torch.nn.Linear


@pytest.mark.parametrize("op", [None, lambda x, w, b, *rest: torch.zeros(x.shape[0], w.shape[0])],
                         ids=["missing", "wrong"])
def test_onednn_linear_falls_back_to_nn_linear_when_the_private_op_fails(monkeypatch, op):
    """The oneDNN op is private: a build without it, or one where it disagrees with aten, keeps plain nn.Linear."""
    monkeypatch.setattr(torch.ops, "mkldnn", SimpleNamespace(**({} if op is None else {"_linear_pointwise": op})))
    precision.onednn_linear_class.cache_clear()
    try:
        assert precision.onednn_linear_class() is torch.nn.Linear
        model = tiny_model()
        precision.apply(model, None, "fp32")
        assert {type(m) for m in model.modules() if isinstance(m, torch.nn.Linear)} == {torch.nn.Linear}
    finally:
        precision.onednn_linear_class.cache_clear()


def test_fp32_and_int8_decode_alike_on_a_trained_like_model():
    model = peaked_model()
    heads = tiny_heads(model, d=2)
    with torch.no_grad():
        cond = model.encode(torch.randn(1, model.cfg.encoder.num_points, 6))
    from xspecmesh.decoding.autoregressive import DecodeStats, decode_ar
    from xspecmesh.decoding.token_sampling import SamplingConfig

    out = {}
    for name in ("fp32", "int8"):
        e = engine_at(model, heads, name)
        steps = decode_ar(e.model, cond, sampling=SamplingConfig(temperature=0), max_tokens=60,
                          generator=torch.Generator().manual_seed(0), stats=DecodeStats())
        out[name] = [t for step in steps for t in step[0]]
    assert out["fp32"] == out["int8"]


def test_auto_rule():
    cpu = torch.device("cpu")
    assert precision.resolve("auto", cpu) == "fp32"
    assert precision.resolve("auto", cpu, {"int8_agreement": 0.95}) == "fp32"
    assert precision.resolve("auto", cpu, {"int8_agreement": 0.995}) == "int8"
    assert precision.resolve("bf16", cpu) == "bf16"
    with pytest.raises(SettingsError, match="CPU only"):
        precision.resolve("int8", torch.device("cuda"))
    with pytest.raises(SettingsError, match="precision must be one of"):
        precision.resolve("int4", cpu)


def test_engine_loads_another_precision_once_per_request_setting(tmp_path):
    path = write_random_checkpoint(tmp_path / "t.safetensors", "tiny", heads=2)
    engine = Engine.load(path, "cpu", "fp32")
    assert engine.precision == "fp32" and engine.info["precision"] == "fp32"
    assert isinstance(engine.model.to_logits, precision.onednn_linear_class())
    pts = np.random.default_rng(0).normal(size=(600, 6)).astype(np.float32)
    auto = engine.generate(pts, DecodeSettings(mode="spec", heads=2, max_tokens=30))
    assert auto.stats["precision"] == "fp32"
    int8 = engine.generate(pts, DecodeSettings(mode="spec", heads=2, max_tokens=30, precision="int8"))
    assert int8.stats["precision"] == "int8" and int8.stats["tokens"] > 0
    sibling = engine.at_precision("int8")
    assert sibling is engine.at_precision("int8") and sibling.at_precision("fp32") is engine
    assert isinstance(sibling.model.to_logits, dynamic.Linear)
    with pytest.raises(SettingsError, match="precision"):
        DecodeSettings.from_dict({"precision": "int4"})


def test_fp32_on_cpu_puts_the_backbone_and_paper_heads_on_onednn_and_a_draft_decoder_on_aten():
    """oneDNN's linear serves the backbone and the paper's heads (large one-row products, few-row verifies); a draft
    decoder's small one-row products stay on aten's path, which is faster for them."""
    linear = precision.onednn_linear_class()
    for kind, cfg, kernel in (("cross", dict(shared_output=False), linear), ("eagle", {}, torch.nn.Linear)):
        model = tiny_model()
        heads = tiny_heads(model, d=2, kind=kind, **cfg)
        precision.apply(model, heads, "fp32")
        assert type(model.layers[0].ff.proj) is linear and type(model.to_logits) is linear
        found = {type(m) for m in heads.modules() if isinstance(m, torch.nn.Linear)}
        assert found == {kernel}, kind


def test_auto_picks_int8_for_a_checkpoint_that_passed(tmp_path):
    model = tiny_model()
    path = save_checkpoint(tmp_path / "passed.safetensors", model, tiny_heads(model, d=1), dtype="float32",
                           meta={"int8_agreement": 0.995})
    assert Engine.load(path, "cpu").precision == "int8"


def test_cli_precision_option(tmp_path, capsys):
    model = tiny_model()
    with torch.no_grad():
        model.to_logits.bias[tok.EOS] -= 1e4  # no early EOS: 200 tokens always hold faces
    path = save_checkpoint(tmp_path / "t.safetensors", model, tiny_heads(model, d=2), dtype="float32")
    pts = np.random.default_rng(0).normal(size=(600, 6)).astype(np.float32)
    np.save(tmp_path / "p.npy", pts)
    code = main(["generate", str(tmp_path / "p.npy"), "-o", str(tmp_path / "o.obj"), "--checkpoint", str(path),
                 "--mode", "ar", "--max-tokens", "200", "--precision", "int8", "--device", "cpu", "--json",
                 "--no-fit"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["precision"] == "int8"
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "x.npy", "-o", "y.obj", "--precision", "int4"])
    assert exit_.value.code == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (unmeasured here)")
def test_bf16_on_cuda():
    model = peaked_model()
    heads = tiny_heads(model, d=2)
    model = model.cuda()
    ref = Engine(Checkpoint(model, heads.cuda(), "t"), torch.device("cuda"), "fp32")
    low = copy.deepcopy(ref)
    precision.apply(low.model, low.ckpt.heads, "bf16")
    low.precision = "bf16"
    result = precision_check.agreement(ref, low, sequences(2, 40, model.cfg.encoder.num_points))
    assert result["agreement"] >= 0.99


def test_a_drafter_with_taps_drafts_at_int8():
    """The tapped layers' projection is a linear like the others: quantized, and decoding with it runs (not
    token-identical to int8 AR: dynamic quantization scales each forward's activations, and a verify holds more
    rows)."""
    from test_speculative import GREEDY, condition, spec
    from xspecmesh.decoding.autoregressive import DecodeStats
    from xspecmesh.decoding.speculative import AcceptConfig

    model = tiny_model()
    e = engine_at(model, tiny_heads(model, d=2, kind="eagle", output="factored", taps=(1,), positions=True), "int8")
    assert isinstance(e.ckpt.heads.tap_fc, dynamic.Linear) and isinstance(e.ckpt.heads.fc, dynamic.Linear)
    cond = condition(e.model, b=2)
    stats = DecodeStats()
    out = spec(e.model, e.ckpt.heads, cond, GREEDY, AcceptConfig("greedy"), 80, d=2, stats=stats)
    assert all(len(seq) > 0 for seq in out) and sum(stats.head_trials) > 0


def test_the_precision_check_scores_a_draft_decoder():
    """The teacher-forced head agreement runs any drafter's training form (it once called the paper heads' API)."""
    model = tiny_model()
    heads = tiny_heads(model, d=2, kind="eagle", output="factored", taps=(1,), positions=True)
    result = precision_check.agreement(engine_at(model, heads, "fp32"), engine_at(model, heads, "int8"),
                                       sequences(2, 40, model.cfg.encoder.num_points))
    assert len(result["head_agreement"]) == 2 and all(0 <= a <= 1 for a in result["head_agreement"])
