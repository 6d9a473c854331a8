"""Token-aware draft decoders (eagle, grounded): their bookkeeping, every acceptance rule with them, checkpoints and
training, on tiny random models."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import xspecmesh.decoding.speculative as speculative
from xspecmesh.decoding.autoregressive import DecodeStats, run_to_end
from xspecmesh.decoding.speculative import AcceptConfig, decode_speculative
from xspecmesh.decoding.token_sampling import SamplingConfig
from xspecmesh.errors import CheckpointError, SettingsError
from xspecmesh.model.checkpoint import load_checkpoint, write_random_checkpoint
from xspecmesh.model.config import HeadsConfig
from xspecmesh.model.drafter import DraftDecoder
from xspecmesh.training.trainer import TrainConfig, Trainer

from conftest import tiny_heads, tiny_model
from test_speculative import GREEDY, _Ticks, ar, condition, spec
from test_train import FAST, batch, changed, snapshot  # noqa: F401 (batch is a fixture)

KINDS = ["eagle", "grounded"]
DRAFTERS = [dict(kind="eagle", output="factored"), dict(kind="eagle", output="shared"),
            dict(kind="grounded", output="factored"), dict(kind="grounded", output="factored", taps=(1,)),
            dict(kind="eagle", output="factored", taps=(1,), positions=True)]  # HeadsConfig fields
DRAFTER_IDS = ["-".join(f"{k}={v}" for k, v in c.items()) for c in DRAFTERS]


class Recorder:
    """Wraps a drafter and records, per step, the outputs (as training computes them from the drafter's features) each
    draft was chosen from, and the drafts."""

    def __init__(self, drafter):
        self.drafter, self.num_heads, self.taps, self.calls = drafter, drafter.num_heads, drafter.taps, []

    def begin(self, model, cond, max_len):
        return self.drafter.begin(model, cond, max_len)

    def propose(self, model, ctx, feats, tokens, counts, drafts, walk):
        seen, best = [], type(self.drafter)._best

        def record(model, g, walk):
            seen.append(self.drafter.outputs(model, g).clone())
            return best(self.drafter, model, g, walk)

        self.drafter._best = record
        try:
            out = self.drafter.propose(model, ctx, feats, tokens, counts, drafts, walk)
        finally:
            del self.drafter._best
        self.calls.append((seen, out.clone()))
        return out


TREE_CASES = [(c, False) for c in DRAFTERS] + [(DRAFTERS[1], True), (DRAFTERS[4], True)]  # (the tree where this
TREE_IDS = DRAFTER_IDS + [DRAFTER_IDS[1] + "-tree", DRAFTER_IDS[4] + "-tree"]  # seed keeps some alternative)


@pytest.mark.parametrize("drafter_cfg, tree", TREE_CASES, ids=TREE_IDS)
def test_drafts_at_inference_are_the_teacher_forced_drafts(drafter_cfg, tree):
    """Every draft whose predecessors were accepted was computed from the same inputs as in training (the
    backbone's features for the committed pairs, the drafter's own for the chain): the decoder's cache bookkeeping,
    ragged catch-up over a batch of two included, matches the unrolled training forward; with the draft tree also
    after steps that kept the alternative first draft (its feature is handed on in d1's place)."""
    model = tiny_model(sharpen=30.0)
    cond = condition(model, b=2)
    drafter = tiny_heads(model, d=4, **drafter_cfg)
    rec = Recorder(drafter)
    emitted = [[], []]
    starts = []  # per step: tokens emitted before it, per sequence
    stats = DecodeStats()
    steps = decode_speculative(model, rec, cond, SamplingConfig(0.8, 20, 1.0), AcceptConfig("threshold", 0.02), 4,
                               120, torch.Generator().manual_seed(3), stats, tree=tree)
    for accepted in steps:
        starts.append([len(e) for e in emitted])
        for e, a in zip(emitted, accepted):
            e.extend(a)
    checked = 0
    with torch.no_grad():
        for b in range(2):
            seq = emitted[b]
            inputs = torch.tensor([[0] + seq])
            _, hidden = model(inputs, cond=cond[b : b + 1], taps=drafter.taps)
            want = drafter(model, hidden, inputs, cond[b : b + 1])  # (1, T, D, ·)
            for (seen, drafts), before in zip(rec.calls, starts[1:]):
                m = before[b]  # r = seq[m - 1] was sampled from the backbone's state at input m - 1
                for k, out in enumerate(seen):
                    if m + k >= len(seq) or drafts[b, :k].tolist() != seq[m : m + k]:
                        break
                    assert torch.allclose(out[b], want[0, m - 1, k], atol=1e-4), (b, m, k)
                    checked += 1
    assert checked > 40
    assert (stats.alternatives > 0) == tree


@pytest.mark.parametrize("drafter_cfg", DRAFTERS, ids=DRAFTER_IDS)
@pytest.mark.parametrize("d, tree", [(1, False), (4, False), (4, True)])
def test_greedy_speculative_equals_greedy_ar(drafter_cfg, d, tree):
    model = tiny_model(sharpen=30.0)
    cond = condition(model, b=3)
    stats = DecodeStats()
    assert spec(model, tiny_heads(model, d=4, **drafter_cfg), cond, GREEDY, AcceptConfig("greedy"), 150, d=d,
                stats=stats, tree=tree) == ar(model, cond, GREEDY, 150)
    assert stats.scr >= 1.0


@pytest.mark.parametrize("drafter_cfg", DRAFTERS, ids=DRAFTER_IDS)
def test_threshold_delta_one_reproduces_ar_sampling(drafter_cfg):
    model = tiny_model(sharpen=30.0)
    cond = condition(model, b=2)
    sampling = SamplingConfig(0.8, 20, 1.0)
    got = spec(model, tiny_heads(model, **drafter_cfg), cond, sampling, AcceptConfig("threshold", 1.0), 150, seed=11)
    assert got == ar(model, cond, sampling, 150, seed=11)


@pytest.mark.parametrize("drafter_cfg", DRAFTERS, ids=DRAFTER_IDS)
def test_adaptive_draft_length_with_a_draft_decoder(drafter_cfg, monkeypatch):
    """Steps without drafts still feed the decoder the committed pairs: greedy stays token-identical."""
    monkeypatch.setattr(speculative, "time", _Ticks())  # (choices by acceptance, not the machine's timing)
    model = tiny_model(sharpen=30.0)
    cond = condition(model, b=2)
    stats = DecodeStats()
    drafter = tiny_heads(model, d=4, **drafter_cfg)
    steps = decode_speculative(model, drafter, cond, GREEDY, AcceptConfig("greedy"), 4, 150,
                               None, stats, adaptive=True)
    assert run_to_end(steps, 2) == ar(model, cond, GREEDY, 150)
    assert stats.draft_hist[0] > 0  # random drafts: some plain AR steps were chosen


def test_untrained_decoder_reads_only_the_backbone_state():
    model = tiny_model()
    drafter = DraftDecoder(model.cfg, tiny_heads(model, kind="eagle").cfg).eval()
    cond = condition(model)
    with torch.no_grad():
        logits, hidden = model(torch.zeros(1, 3, dtype=torch.long), cond=cond)
        first = drafter(model, hidden, torch.zeros(1, 3, dtype=torch.long), cond)[:, :, 0]
    want = model.to_logits(torch.nn.functional.layer_norm(hidden, hidden.shape[-1:]))
    assert torch.allclose(first, want, atol=1e-4)


def test_factored_logits_sum_each_tokens_axis_and_class_logits():
    from xspecmesh.geometry import tokenizer as tok
    from xspecmesh.model.drafter import FACTORED_WIDTH, factored_logits
    from xspecmesh.training.axis_factors import NULL_ROW, axis_rows

    x = torch.randn(2, FACTORED_WIDTH)
    rows, cls = torch.from_numpy(axis_rows(tok.VOCAB_SIZE)), torch.from_numpy(tok.token_classes())
    axes = torch.cat([x[:, :NULL_ROW], torch.zeros(2, 1)], 1)  # EOS has no axis values
    assert torch.allclose(factored_logits(x), axes[:, rows].sum(-1) + x[:, NULL_ROW:][:, cls])


def test_inference_folds_the_first_layer_and_follows_weight_changes():
    """Without gradients the drafter's input layer reads lookup tables and a folded tap product made from its weights
    (`_inference_weights`); they give what the layer gives, and are remade when a weight changes (as in training
    between evaluations), a tap norm's included."""
    model = tiny_model()
    drafter = tiny_heads(model, d=2, kind="eagle", output="factored", taps=(1,), positions=True)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 3, 2 * model.cfg.dim, generator=g)
    tokens, pos = torch.randint(0, 5121, (2, 3), generator=g), torch.tensor([[0, 5, 9], [3, 4, 2000]])
    for _ in range(3):
        with torch.no_grad():
            folded = drafter._pairs(model, feats, tokens, pos)
        assert torch.allclose(folded, drafter._pairs(model, feats, tokens, pos), atol=1e-5)
        with torch.no_grad():
            drafter.fc.weight.add_(0.1)
            model.token_embed.weight.mul_(2.0)
            drafter.tap_fc.weight.mul_(-1.5)
            drafter.tap_norms[0].weight.add_(0.2)
            drafter.tap_norms[0].bias.sub_(0.3)


def test_a_factored_outputs_best_token_is_found_from_its_axes():
    """`factored_best` (the host-side search of a factored output) gives what masking and searching its 5121 logits
    gives: the best allowed token, its probability, the runner-up; in every grammar state, ties included."""
    from xspecmesh.decoding.token_sampling import NUM_STATES, Grammar
    from xspecmesh.model.drafter import FACTORED_WIDTH, factored_best, factored_logits

    grammar = Grammar()
    g = torch.Generator().manual_seed(0)
    y = torch.randn(400, FACTORED_WIDTH, generator=g) * 3
    y[::4] = y[::4].round()  # (many ties)
    states = torch.arange(400) % NUM_STATES
    logits = factored_logits(y).masked_fill(~grammar.mask(states), float("-inf"))
    top = logits.topk(2, -1)
    for i in range(len(y)):
        token, prob, second = factored_best(y[i].tolist(), grammar.classes[int(states[i])], True)
        assert logits[i, token] == top.values[i, 0] and (i % 4 or token == int(logits[i].argmax()))
        assert prob == pytest.approx(float(logits[i].softmax(-1).max()), rel=1e-5)
        assert (second == -1) == (top.values[i, 1] == float("-inf"))
        assert second == -1 or second != token and logits[i, second] == top.values[i, 1]
        assert factored_best(y[i].tolist(), grammar.classes[int(states[i])], False)[2] == -1


def test_factored_output_starts_as_the_least_squares_fit_of_the_backbones():
    from xspecmesh.model.config import HeadsConfig
    from xspecmesh.model.drafter import FACTORED_WIDTH, drafter_for_backbone, factored_logits

    model = tiny_model()
    drafter = drafter_for_backbone(model, HeadsConfig(num_heads=2, kind="eagle", output="factored"))
    basis = factored_logits(torch.eye(FACTORED_WIDTH)).T
    fit = torch.cat([drafter.to_axes.weight, drafter.to_axes.bias[:, None]], 1)
    full = torch.cat([model.to_logits.weight, model.to_logits.bias[:, None]], 1)
    residual = basis @ fit - full
    assert (basis.T @ residual).abs().max() < 1e-3  # the normal equations: no axis or class row can do better
    assert residual.norm() < full.norm()


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_records_the_drafter_kind(tmp_path, kind):
    path = write_random_checkpoint(tmp_path / "m.safetensors", "tiny", heads=3, head_kind=kind)
    ck = load_checkpoint(path)
    assert isinstance(ck.heads, DraftDecoder) and ck.heads.cfg.kind == kind and ck.max_heads == 3


def test_engine_reports_the_drafter_kind(tmp_path):
    from xspecmesh.decoding.engine import Engine

    info = Engine.load(write_random_checkpoint(tmp_path / "m.safetensors", "tiny", heads=2, head_kind="eagle")).info
    assert info["drafter"] == "eagle" and info["heads"] == 2


def test_taps_are_checked_and_recorded(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="outside"):
        DraftDecoder(model.cfg, HeadsConfig(kind="eagle", taps=(3,)))  # the tiny backbone has 2 layers
    with pytest.raises(ValueError, match="eagle"):
        DraftDecoder(model.cfg, HeadsConfig(kind="grounded", positions=True))
    cfg = HeadsConfig(kind="eagle", output="factored", taps=[2, 1], positions=True)
    assert cfg.taps == (1, 2) and HeadsConfig.from_json(cfg.to_json()) == cfg
    _, hidden = model(torch.zeros(1, 3, dtype=torch.long), cond=condition(model), taps=cfg.taps)
    assert hidden.shape[-1] == 3 * model.cfg.dim


@pytest.mark.parametrize("old, new", [(dict(), dict(taps=(1, 2), positions=True)),
                                      (dict(taps=(2,)), dict(taps=(2,), positions=True)),
                                      (dict(), dict(positions=True)),
                                      (dict(taps=(1,), positions=True), dict(taps=(1,), positions=True, ff_mult=3)),
                                      (dict(positions=True), dict(positions=True, num_heads=5))])
def test_a_grown_drafter_computes_what_it_grew_from(old, new):
    from xspecmesh.model.drafter import grow

    model = tiny_model()
    cond = condition(model)
    small = tiny_heads(model, kind="eagle", output="factored", **old)
    big = grow(small, dataclasses.replace(small.cfg, **new))
    inputs = torch.tensor([[0, 3, 600, 7, 900, 4608 + 9, 12]])
    with torch.no_grad():
        want = small(model, model(inputs, cond=cond, taps=small.taps)[1], inputs, cond)
        got = big(model, model(inputs, cond=cond, taps=big.taps)[1], inputs, cond)
    # (more drafts unrolled: the first ones are the same)
    assert big.cfg.taps == new.get("taps", ()) and torch.allclose(got[:, :, : small.num_heads], want, atol=1e-5)
    assert grow(big, small.cfg) is None  # inputs and width are only ever added
    assert grow(small, dataclasses.replace(small.cfg, kind="grounded")) is None  # another kind is no growth
    if big.cfg.ff_mult > small.cfg.ff_mult:  # the new units train: their output weights get a gradient
        got = big(model, model(inputs, cond=cond, taps=big.taps)[1], inputs, cond)
        got.square().sum().backward()
        width = small.block.ff.out.in_features
        assert big.block.ff.out.weight.grad[:, width:].abs().sum() > 0


def test_training_taps_goes_on_from_the_checkpoints_drafter(tmp_path):
    init = write_random_checkpoint(tmp_path / "m.safetensors", "tiny", heads=3, head_kind="eagle")
    before = load_checkpoint(init).heads
    tr = Trainer(TrainConfig(stage="heads", init=str(init), out=str(tmp_path / "h"), num_heads=3, head_type="eagle",
                             head_full_vocab=True, head_taps="1", head_positions=True, **FAST))
    assert tr.heads.cfg.taps == (1,) and tr.heads.cfg.positions
    assert torch.equal(tr.heads.fc.weight[:, : before.fc.in_features], before.fc.weight)
    assert torch.equal(tr.heads.block.ff.out.weight, before.block.ff.out.weight)


def test_heads_init_starts_the_drafter_from_another_backbones_checkpoint(tmp_path):
    backbone = write_random_checkpoint(tmp_path / "bb.safetensors", "tiny", heads=0, seed=1)
    other = write_random_checkpoint(tmp_path / "other.safetensors", "tiny", heads=3, head_kind="eagle")
    source = load_checkpoint(other).heads
    tr = Trainer(TrainConfig(stage="heads", init=str(backbone), heads_init=str(other), out=str(tmp_path / "h"),
                             num_heads=3, head_type="eagle", head_full_vocab=True, head_positions=True, **FAST))
    assert tr.heads.cfg.positions and torch.equal(tr.heads.block.ff.out.weight, source.block.ff.out.weight)
    assert not torch.equal(tr.model.token_embed.weight, load_checkpoint(other).model.token_embed.weight)
    with pytest.raises(SettingsError, match="no drafter"):
        Trainer(TrainConfig(stage="heads", init=str(other), heads_init=str(backbone), out=str(tmp_path / "x"),
                            num_heads=3, head_type="eagle", **FAST))
    small = write_random_checkpoint(tmp_path / "small.safetensors", "small", heads=3, head_kind="eagle")
    with pytest.raises(SettingsError, match="config"):
        Trainer(TrainConfig(stage="heads", init=str(backbone), heads_init=str(small), out=str(tmp_path / "y"),
                            num_heads=3, head_type="eagle", **FAST))


def test_unknown_drafter_kind_is_a_clear_error(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    path = write_random_checkpoint(tmp_path / "m.safetensors", "tiny", heads=2)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta["heads_config"] = json.dumps({**json.loads(meta["heads_config"]), "kind": "telepathy"})
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="telepathy"):
        load_checkpoint(path)
    with pytest.raises(SettingsError, match="head-type"):
        Trainer(TrainConfig(stage="heads", init=str(path), out=str(tmp_path / "h"), head_type="telepathy", **FAST))


@pytest.mark.parametrize("kind, extra", [("eagle", {}), ("grounded", {}),
                                         ("eagle", {"head_taps": "1", "head_positions": True})])
def test_stage1_trains_a_draft_decoder_on_own_samples_and_stage2_continues_it(tmp_path, batch,  # noqa: F811
                                                                               kind, extra):
    init = write_random_checkpoint(tmp_path / "bb.safetensors", "tiny", heads=0)
    tr = Trainer(TrainConfig(stage="heads", init=str(init), out=str(tmp_path / "h"), steps=6, lr=3e-3, num_heads=3,
                             head_type=kind, self_samples=0.5, **extra, **FAST))
    model_before, heads_before = snapshot(tr.model), snapshot(tr.heads)
    first = tr.loss(*batch)[0].item()
    tr.run()
    assert not changed(model_before, tr.model) and changed(heads_before, tr.heads)
    assert tr.sample_draws > 0  # some micro-batches were the backbone's own samples
    assert tr.loss(*batch)[0].item() < first
    stage1 = tmp_path / "h" / "model.safetensors"
    assert load_checkpoint(stage1).heads.cfg == tr.heads.cfg and tr.heads.cfg.kind == kind
    if extra:  # the tapped layers' input columns started at zero and learned
        assert tr.heads.cfg.taps == (1,) and tr.heads.cfg.positions
        assert tr.heads.tap_fc.weight.abs().sum() > 0
    lora = Trainer(TrainConfig(stage="lora", init=str(stage1), out=str(tmp_path / "l"), steps=2, num_heads=3,
                               head_type=kind, **extra, **FAST))
    lora.run()
    ck = load_checkpoint(tmp_path / "l" / "model.safetensors")
    assert isinstance(ck.heads, DraftDecoder) and ck.heads.cfg == tr.heads.cfg


def test_a_factored_drafters_loss_in_closed_form_is_the_loss_over_its_logits():
    """Training's factored loss (from the FACTORED_WIDTH values: log-normaliser, the teacher's class and axis
    marginals, argmax) gives the loss, gradient and agreement that the 5121 logits `factored_logits` makes give."""
    from xspecmesh.model.drafter import FACTORED_WIDTH, factored_argmax, factored_log_normalizer, factored_logits
    from xspecmesh.training.trainer import head_distillation_loss

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 7, 3, FACTORED_WIDTH, generator=g) * 2).requires_grad_()
    teacher = torch.randn(2, 7, 5121, generator=g) * 3
    teacher[0, 2, 4700] += 20  # (confident rows, a special block's among them, as a backbone's often are)
    teacher[1, 1, 5120] += 20
    targets = torch.randint(0, 5121, (2, 7), generator=g)
    targets[1, 5:] = -1  # (padding)
    y = x.detach().clone().requires_grad_()
    dense, dense_agree = head_distillation_loss(factored_logits(y), teacher, targets, 0.8, 0.1)
    closed, closed_agree = head_distillation_loss(x, teacher, targets, 0.8, 0.1, factored=True)
    dense.backward()
    closed.backward()
    assert closed.item() == pytest.approx(dense.item(), rel=1e-5)
    assert torch.allclose(x.grad, y.grad, atol=1e-6)
    assert closed_agree == dense_agree
    flat = x.detach().flatten(0, 2)
    flat[::5] = flat[::5].round()  # (ties: the lower token id wins in both)
    assert torch.allclose(factored_log_normalizer(flat), factored_logits(flat).logsumexp(-1), atol=1e-5)
    assert torch.equal(factored_argmax(flat), factored_logits(flat).argmax(-1))


def test_the_teacher_at_a_temperature_is_the_backbones_sampling_distribution():
    """--teacher-temperature T: the drafter matches softmax(logits / T), the distribution the add-on samples from at
    temperature T (dense and factored alike); agreement still counts the backbone's argmax."""
    from xspecmesh.model.drafter import FACTORED_WIDTH, factored_logits
    from xspecmesh.training.trainer import head_distillation_loss

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 2, FACTORED_WIDTH, generator=g)
    teacher = torch.randn(2, 6, 5121, generator=g) * 3
    targets = torch.randint(0, 5121, (2, 6), generator=g)
    s = factored_logits(x).log_softmax(-1)
    t = (teacher / 0.5).log_softmax(-1)
    kl = [(t[:, k:].exp() * (t[:, k:] - s[:, :-k, k - 1])).sum(-1).mean() for k in (1, 2)]
    expected = (kl[0] + 0.8 * kl[1]) / 1.8
    for out, factored in ((factored_logits(x), False), (x, True)):
        loss, agree = head_distillation_loss(out, teacher, targets, 0.8, 0.0, factored, temperature=0.5)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
        assert agree == head_distillation_loss(out, teacher, targets, 0.8, 0.0, factored)[1]
    assert head_distillation_loss(x, teacher, targets, 0.8, 0.0, True, 0.5)[0].item() != pytest.approx(
        head_distillation_loss(x, teacher, targets, 0.8, 0.0, True)[0].item(), rel=1e-3)


def test_drafting_before_begin_says_what_is_missing():
    from xspecmesh.decoding.token_sampling import DraftWalk, Grammar

    model = tiny_model()
    drafter = tiny_heads(model, d=2, kind="eagle", output="factored")
    feats, tokens = torch.zeros(1, 1, model.cfg.dim), torch.zeros(1, 1, dtype=torch.long)
    walk = DraftWalk(Grammar(), Grammar().start(1))
    with pytest.raises(RuntimeError, match="call begin first"), torch.no_grad():
        drafter.propose(model, None, feats, tokens, torch.ones(1, dtype=torch.long), 2, walk)
