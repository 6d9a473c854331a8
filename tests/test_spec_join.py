"""Continuous batching of speculative decoding: more objects than slots, each joining sequence with a fresh backbone
cache row, drafter state, grammar state and generator, gets what decoding it alone gives; finished rows leave the
batch. Tiny random models, every drafter kind; no timings."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from xspecmesh.decoding.autoregressive import run_to_end
from xspecmesh.decoding.engine import DecodeSettings, Engine
from xspecmesh.decoding.speculative import AcceptConfig, decode_speculative
from xspecmesh.decoding.token_sampling import SamplingConfig
from xspecmesh.geometry import tokenizer as tok
from xspecmesh.model.checkpoint import write_random_checkpoint
from xspecmesh.model.drafter import DECODER_KINDS, KINDS
from xspecmesh.model.kv_cache import KVCache

from conftest import tiny_heads, tiny_model

GREEDY = SamplingConfig(temperature=0.0)
LIMITS = (40, 95, 20, 70, 55)  # uneven lengths: objects finish at different steps
D = 3


@pytest.fixture(scope="module")
def model():
    m = tiny_model(sharpen=30.0)
    with torch.no_grad():
        m.to_logits.bias[tok.EOS] += 4.0  # some objects end at their own EOS, before their limit
    return m


@pytest.fixture(scope="module")
def conds(model):
    torch.manual_seed(3)
    with torch.no_grad():
        return [model.encode(torch.randn(1, model.cfg.encoder.num_points, 6)) for _ in LIMITS]


def alone(model, heads, cond, sampling, accept, limit, seed, adaptive=False):
    steps = decode_speculative(model, heads, cond, sampling, accept, D, limit, torch.Generator().manual_seed(seed),
                               adaptive=adaptive)
    return run_to_end(steps, 1)[0]


def joined(model, heads, conds, sampling, accept, slots, seeds, adaptive=False, stop=None):
    """Every object through one decoder, `slots` at a time, waiting ones joining as slots free up; each cut at its
    own limit by the caller (as Engine.stream_batch does). `stop`: {object: tokens after which it is cancelled}."""
    stop = stop or {}
    holder = list(range(slots))
    waiting = iter(range(slots, len(conds)))
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out: list[list[int]] = [[] for _ in conds]
    finished = torch.zeros(slots, dtype=torch.bool)

    def join(free):
        taken = []
        for slot, i in zip(free, waiting):
            holder[slot] = i
            taken.append((slot, conds[i], gens[i]))
        return taken

    steps = decode_speculative(model, heads, torch.cat(conds[:slots]), sampling, accept, D, max(LIMITS),
                               gens[:slots], adaptive=adaptive, finished=finished, join=join)
    for accepted in steps:
        for slot, new in enumerate(accepted):
            i = holder[slot]
            out[i] = (out[i] + new)[: LIMITS[i]]
            if len(out[i]) == LIMITS[i] or len(out[i]) >= stop.get(i, LIMITS[i]):
                finished[slot] = True
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("accept", [AcceptConfig("greedy"), AcceptConfig("threshold", 0.0)], ids=["greedy", "delta0"])
def test_every_joining_object_gets_its_tokens_alone(model, conds, kind, accept):
    """Greedy acceptance checks the backbone's cache rows and grammar states; δ = 0 accepts every draft, so there
    the tokens are the drafter's own and a joining row's stale drafter state (history, condition) would show."""
    heads = tiny_heads(model, d=4, kind=kind, output="factored" if kind in DECODER_KINDS else "shared")
    seeds = range(10, 10 + len(LIMITS))
    got = joined(model, heads, conds, GREEDY, accept, 2, seeds)
    want = [alone(model, heads, c, GREEDY, accept, n, s) for c, n, s in zip(conds, LIMITS, seeds)]
    assert got == want
    if accept.rule == "greedy":
        ends = [len(w) < n for w, n in zip(want, LIMITS)]
        assert any(ends) and not all(ends)  # some ended at EOS, some at their limit


@pytest.mark.parametrize("kind", ["cross", "eagle"])
def test_rows_restart_and_leave(model, conds, kind, monkeypatch):
    """5 objects in 2 slots: three join (the backbone's and the drafter's rows restarted), then the batch drains."""
    heads = tiny_heads(model, d=4, kind=kind)
    restarts, kept = [], []
    for cls, name, log in [(KVCache, "restart", restarts), (KVCache, "keep", kept), (type(heads), "restart", restarts),
                           (type(heads), "keep", kept)]:
        real = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda *a, real=real, log=log, name=name, cls=cls: (
            log.append(cls.__name__), real(*a))[1])
    joined(model, heads, conds, GREEDY, AcceptConfig("greedy"), 2, range(5))
    backbone = restarts.count("KVCache") - (3 if kind in DECODER_KINDS else 0)  # a draft decoder's own cache too
    assert backbone == 3 and restarts.count(type(heads).__name__) == 3
    assert "KVCache" in kept and type(heads).__name__ in kept, "no finished row left the batch"


@pytest.mark.parametrize("kind", ["cross", "eagle"])
def test_adaptive_draft_length_joins_too(model, conds, kind):
    heads = tiny_heads(model, d=4, kind=kind)
    seeds = range(5)
    got = joined(model, heads, conds, GREEDY, AcceptConfig("greedy"), 2, seeds, adaptive=True)
    assert got == [alone(model, heads, c, GREEDY, AcceptConfig("greedy"), n, s, adaptive=True)
                   for c, n, s in zip(conds, LIMITS, seeds)]


@pytest.mark.parametrize("kind", ["cross", "eagle"])
def test_sampling_is_reproducible_and_the_exact_rule_matches_decoding_alone(model, conds, kind):
    """Each object draws from its own generator, a joining one from its first token on, and with a fixed draft
    length every row draws the same numbers batched as alone: the lossless rule then samples each object's own
    tokens; any rule is reproducible for given seeds and slots, and each seed counts."""
    heads = tiny_heads(model, d=4, kind=kind)
    sampling = SamplingConfig(1.0, 20, 1.0)
    exact, threshold = AcceptConfig("exact"), AcceptConfig("threshold", 0.3)
    seeds = list(range(20, 25))
    got = joined(model, heads, conds, sampling, exact, 2, seeds)
    assert got == [alone(model, heads, c, sampling, exact, n, s) for c, n, s in zip(conds, LIMITS, seeds)]
    first = joined(model, heads, conds, sampling, threshold, 3, seeds)
    assert first == joined(model, heads, conds, sampling, threshold, 3, seeds)
    assert first != joined(model, heads, conds, sampling, threshold, 3, [s + 100 for s in seeds])


def test_a_cancelled_row_frees_its_slot_for_the_next(model, conds):
    heads = tiny_heads(model, d=4, kind="eagle")
    seeds = range(5)
    full = joined(model, heads, conds, GREEDY, AcceptConfig("threshold", 0.0), 2, seeds)
    cut = joined(model, heads, conds, GREEDY, AcceptConfig("threshold", 0.0), 2, seeds, stop={1: 8})
    assert 8 <= len(cut[1]) < len(full[1]) and cut[1] == full[1][: len(cut[1])]
    assert [cut[i] for i in (0, 2, 3, 4)] == [full[i] for i in (0, 2, 3, 4)]


def test_a_token_limit_of_one_still_decodes_every_object(model, conds):
    """Every sequence ends at its first token (the join's prefill): the waiting ones still get their turn."""
    heads = tiny_heads(model, d=4)
    finished = torch.zeros(1, dtype=torch.bool)
    waiting = iter(range(1, 5))
    gens = [torch.Generator().manual_seed(s) for s in range(5)]
    steps = decode_speculative(model, heads, conds[0], GREEDY, AcceptConfig("greedy"), D, 1, gens[:1],
                               finished=finished,
                               join=lambda free: [(slot, conds[i], gens[i]) for slot, i in zip(free, waiting)])
    assert run_to_end(steps, 1) == [[alone(model, heads, c, GREEDY, AcceptConfig("greedy"), 1, s)[0]
                                                  for c, s in zip(conds, range(5))]]


# ---------------------------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module", params=["cross", "eagle"])
def engine(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "t.safetensors"
    eng = Engine.load(str(write_random_checkpoint(path, "tiny", heads=4, head_kind=request.param)), "cpu")
    if request.param in DECODER_KINDS:  # zero-started branches would make the drafter ignore its history
        with torch.no_grad():
            for p in eng.ckpt.heads.parameters():
                p.normal_(0.0, 0.3)
    return eng


def clouds(n, count=256):
    rng = np.random.default_rng(11)
    return [np.concatenate([x := rng.normal(size=(count, 3)) * (0.2 + 0.1 * i),
                            x / np.linalg.norm(x, axis=1, keepdims=True)], 1).astype(np.float32) for i in range(n)]


def stream(engine, pts, settings, slots, stop_after=None):
    conds = [engine.condition(p, s.seed) for p, s in zip(pts, settings)]
    stop = {i for i, n in (stop_after or {}).items() if n == 0}  # 0: cancelled before it starts
    out = [{"tokens": [], "updates": 0, "stats": {}} for _ in pts]
    for i, upd in engine.stream_batch(conds, settings, stop, slots):
        out[i]["tokens"] += upd.tokens
        out[i]["updates"] += 1
        out[i]["stats"] = upd.stats | {"done": upd.done}
        if stop_after and stop_after.get(i) and out[i]["updates"] >= stop_after[i]:
            stop.add(i)
    return out


@pytest.mark.parametrize("accept", [dict(accept="greedy"), dict(accept="threshold", delta=0.0)],
                         ids=["greedy", "delta0"])
def test_engine_batch_of_five_in_two_slots_gives_each_objects_tokens_alone(engine, accept):
    pts = clouds(5)
    settings = [DecodeSettings(mode="spec", heads=3, temperature=0.0, max_tokens=mt, max_faces=mf, seed=s, **accept)
                for s, mt, mf in ((1, 60, None), (2, 120, None), (3, 30, None), (4, 90, 5), (5, 75, None))]
    got = stream(engine, pts, [dataclasses.replace(s) for s in settings], slots=2)
    for p, s, g in zip(pts, settings, got):
        res = engine.generate(p, s)
        assert g["tokens"] == res.tokens and g["stats"]["done"] and g["stats"]["steps"] == res.stats["steps"]
        assert g["stats"]["complete"] == res.stats["complete"] and g["stats"]["faces"] == res.stats["faces"]
        assert len(g["tokens"]) <= s.max_tokens
    assert got[3]["stats"]["faces"] == 5 and not got[3]["stats"]["complete"]
    assert [len(g["tokens"]) for i, g in enumerate(got) if i != 3] == [60, 120, 30, 75]  # (this model never ends)
    assert max(g["stats"]["batch_steps"] for g in got) < sum(g["updates"] for g in got)  # the objects overlapped


def test_engine_cancels_a_waiting_and_a_running_object(engine):
    pts = clouds(5)
    settings = [DecodeSettings(mode="spec", heads=3, temperature=0.0, max_tokens=80, seed=s) for s in range(5)]
    full = stream(engine, pts, [dataclasses.replace(s) for s in settings], slots=2)
    cut = stream(engine, pts, [dataclasses.replace(s) for s in settings], slots=2, stop_after={1: 2, 3: 0})
    assert cut[1]["updates"] == 2 and not cut[1]["stats"]["done"]
    assert cut[1]["tokens"] == full[1]["tokens"][: len(cut[1]["tokens"])] and len(cut[1]["tokens"]) > 0
    assert cut[3]["updates"] == 0
    assert [cut[i]["tokens"] for i in (0, 2, 4)] == [full[i]["tokens"] for i in (0, 2, 4)]
