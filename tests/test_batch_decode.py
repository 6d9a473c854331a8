"""Batched decoding (Engine.stream_batch): each object of a batch gets what decoding it alone gives (greedy), its own
seed, EOS and limits, and can be dropped mid-batch. Tiny random checkpoints; no timings."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from xspecmesh.decoding.engine import DecodeSettings, Engine
from xspecmesh.errors import SettingsError
from xspecmesh.geometry import tokenizer as tok
from xspecmesh.model.checkpoint import write_random_checkpoint


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    eng = Engine.load(str(write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "t.safetensors", "tiny", heads=4)),
                      "cpu")
    with torch.no_grad():  # EOS likely enough that sampled sequences end at different lengths
        eng.model.to_logits.bias[tok.EOS] += 3.0
    return eng


def clouds(n, count=256):
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        xyz = rng.normal(size=(count, 3)) * (0.2 + 0.1 * i)
        out.append(np.concatenate([xyz, xyz / np.linalg.norm(xyz, axis=1, keepdims=True)], 1).astype(np.float32))
    return out


def alone(engine, points, settings):
    res = engine.generate(points, settings)
    return res.tokens, res.triangles, res.stats


def batched(engine, points, settings, stop_after=None, slots=None):
    conds = [engine.condition(p, s.seed) for p, s in zip(points, settings)]
    out = [{"tokens": [], "tris": [], "stats": {}, "updates": 0} for _ in points]
    stop: set[int] = set()
    for i, upd in engine.stream_batch(conds, settings, stop, slots):
        assert not out[i]["stats"].get("done_seen"), "an update after done"
        out[i]["tokens"] += upd.tokens
        out[i]["tris"].append(upd.triangles)
        out[i]["stats"] = upd.stats | {"done_seen": upd.done}
        out[i]["updates"] += 1
        if stop_after and i in stop_after and out[i]["updates"] >= stop_after[i]:
            stop.add(i)
    for o in out:
        o["tris"] = np.concatenate(o["tris"]) if o["tris"] else np.zeros((0, 3, 3), np.float32)
    return out


GREEDY = [dict(mode="ar"), dict(mode="spec", accept="greedy"), dict(mode="spec", accept="threshold", delta=0.0),
          dict(mode="naive")]


@pytest.mark.parametrize("slots", [None, 2], ids=["together", "joining"])
@pytest.mark.parametrize("kw", GREEDY, ids=["ar", "spec-greedy", "spec-threshold", "naive"])
def test_greedy_batch_gives_each_objects_tokens_alone(engine, kw, slots):
    pts = clouds(4)
    settings = [DecodeSettings(temperature=0.0, max_tokens=mt, seed=s, **kw)
                for s, mt in ((1, 60), (2, 90), (3, 45), (4, 70))]
    got = batched(engine, pts, [dataclasses.replace(s) for s in settings], slots=slots)
    for p, s, g in zip(pts, settings, got):
        tokens, tris, stats = alone(engine, p, s)
        assert g["tokens"] == tokens
        np.testing.assert_array_equal(g["tris"], tris)
        assert g["stats"]["done_seen"] and g["stats"]["complete"] == stats["complete"]
        assert g["stats"]["tokens"] == len(tokens) <= s.max_tokens
        assert g["stats"]["batch"] == (slots or 4)


@pytest.mark.parametrize("slots", [None, 3], ids=["together", "joining"])
@pytest.mark.parametrize("kw", [dict(mode="ar"), dict(mode="spec", accept="exact"), dict(mode="spec", accept="topk"),
                                dict(mode="spec", accept="threshold")], ids=["ar", "exact", "topk", "threshold"])
def test_sampled_batch_is_reproducible_and_each_seed_counts(engine, kw, slots):
    pts = clouds(5)
    settings = [DecodeSettings(temperature=1.0, max_tokens=120, seed=s, **kw) for s in (5, 6, 7, 8, 9)]
    first = batched(engine, pts, settings, slots=slots)
    assert all(o["stats"]["done_seen"] for o in first)
    again = batched(engine, pts, [dataclasses.replace(s) for s in settings], slots=slots)
    assert [o["tokens"] for o in first] == [o["tokens"] for o in again]
    reseeded = batched(engine, pts, [dataclasses.replace(s, seed=s.seed + 100) for s in settings], slots=slots)
    assert [o["tokens"] for o in first] != [o["tokens"] for o in reseeded]


@pytest.mark.parametrize("slots", [None, 2], ids=["together", "joining"])
def test_ar_sampling_per_sequence_seed_matches_decoding_alone(engine, slots):
    """AR draws one number per step from the object's own generator, so even sampled tokens match decoding alone
    (a joining object starts its own generator when it takes a slot)."""
    pts = clouds(4)
    settings = [DecodeSettings(mode="ar", temperature=1.0, max_tokens=80, seed=s) for s in (11, 12, 13, 14)]
    got = batched(engine, pts, settings, slots=slots)
    lengths = set()
    for p, s, g in zip(pts, settings, got):
        assert g["tokens"] == alone(engine, p, s)[0]
        lengths.add(len(g["tokens"]))
    assert len(lengths) > 1  # sequences ended at their own EOS, at different lengths


@pytest.mark.parametrize("slots", [None, 2], ids=["together", "joining"])
@pytest.mark.parametrize("mode", ["ar", "spec"])
def test_each_object_stops_at_its_own_face_and_token_limits(engine, mode, slots):
    pts = clouds(3)
    settings = [DecodeSettings(mode=mode, temperature=0.0, max_tokens=200, max_faces=2, seed=1),
                DecodeSettings(mode=mode, temperature=0.0, max_tokens=30, seed=2),
                DecodeSettings(mode=mode, temperature=0.0, max_tokens=200, seed=3)]
    with torch.no_grad():
        bias = engine.model.to_logits.bias[tok.EOS].item()
        engine.model.to_logits.bias[tok.EOS] = -1e4  # no EOS: only the limits stop a sequence
    try:
        got = batched(engine, pts, settings, slots=slots)
    finally:
        with torch.no_grad():
            engine.model.to_logits.bias[tok.EOS] = bias
    assert got[0]["stats"]["faces"] == len(got[0]["tris"]) == 2 and not got[0]["stats"]["complete"]
    assert len(got[1]["tokens"]) == 30 and not got[1]["stats"]["complete"]
    assert len(got[2]["tokens"]) == min(200, engine.model.cfg.max_seq_len - 9)
    assert got[0]["updates"] < got[1]["updates"] < got[2]["updates"]
    if slots and mode == "ar":  # the third object took the first one's slot once that one was full
        assert got[2]["stats"]["batch_steps"] > got[2]["updates"]


@pytest.mark.parametrize("slots", [None, 2], ids=["together", "joining"])
def test_a_dropped_object_stops_and_the_others_finish_unchanged(engine, slots):
    pts = clouds(3)
    settings = [DecodeSettings(mode="spec", temperature=0.0, max_tokens=80, seed=s) for s in (1, 2, 3)]
    full = batched(engine, pts, settings, slots=slots)
    cut = batched(engine, pts, [dataclasses.replace(s) for s in settings], stop_after={1: 2}, slots=slots)
    assert cut[1]["updates"] == 2 and not cut[1]["stats"]["done_seen"]
    assert cut[1]["tokens"] == full[1]["tokens"][: len(cut[1]["tokens"])]
    assert [cut[i]["tokens"] for i in (0, 2)] == [full[i]["tokens"] for i in (0, 2)]


def test_a_batch_refuses_mixed_settings(engine):
    conds = [engine.condition(p, 0) for p in clouds(2)]
    with pytest.raises(SettingsError, match="share"):
        list(engine.stream_batch(conds, [DecodeSettings(mode="ar"), DecodeSettings(mode="spec")]))


@pytest.mark.parametrize("mode", ["ar", "spec"])
def test_finished_objects_leave_the_batch_and_the_rest_is_unchanged(engine, mode, monkeypatch):
    from xspecmesh.model.kv_cache import KVCache

    kept = []
    keep = KVCache.keep
    monkeypatch.setattr(KVCache, "keep", lambda self, rows: (kept.append(rows.tolist()), keep(self, rows))[1])
    pts = clouds(4)
    settings = [DecodeSettings(mode=mode, temperature=0.0, max_tokens=mt, seed=s)
                for s, mt in ((1, 20), (2, 90), (3, 30), (4, 70))]
    got = batched(engine, pts, settings, slots=3)  # the fourth joins, then the batch drains
    assert kept and len(kept[-1]) < 3, "no sequence left the batch"
    for p, s, g in zip(pts, settings, got):
        assert g["tokens"] == alone(engine, p, s)[0]


def test_one_slot_decodes_every_object_in_turn(engine):
    pts = clouds(3)
    settings = [DecodeSettings(mode="ar", temperature=0.0, max_tokens=30, seed=s) for s in (1, 2, 3)]
    got = batched(engine, pts, settings, slots=1)
    for p, s, g in zip(pts, settings, got):
        assert g["stats"]["done_seen"] and g["tokens"] == alone(engine, p, s)[0]


@pytest.mark.parametrize("mode, slots", [("spec", 2), ("naive", 2), ("ar", 1)])
def test_a_cancelled_object_takes_no_slot(engine, mode, slots, monkeypatch):
    """Objects in `stop` before they start (cancelled at once, or while waiting) never decode: naive rounds are
    made of the objects still wanted, and joining (AR, spec) skips them."""
    pts = clouds(5)
    conds = [engine.condition(p, s) for s, p in enumerate(pts)]
    settings = [DecodeSettings(mode=mode, temperature=0.0, max_tokens=30, seed=s) for s in range(5)]
    decoded = []  # the objects each decoder starts with or takes in

    def index(cond):
        return next(i for i, c in enumerate(conds) if c is cond or torch.equal(c, cond))

    real = Engine.decoder

    def decoder(self, cond, settings, stats, generator, max_tokens, finished, join):
        decoded.extend(index(c[None]) for c in cond)
        if join is not None:
            inner = join
            join = lambda free: [decoded.append(index(c)) or (s, c, g) for s, c, g in inner(free)]
        return real(self, cond, settings, stats, generator, max_tokens, finished, join)

    monkeypatch.setattr(Engine, "decoder", decoder)
    stop = {1}
    seen = set()
    for i, upd in engine.stream_batch(conds, settings, stop, slots):
        seen.add(i)
        stop.add(3)  # cancelled while it waits
    assert sorted(decoded) == [0, 2, 4] and seen == {0, 2, 4}


def fitted_batch(engine, points, settings):
    conds = [engine.condition(p, s.seed) for p, s in zip(points, settings)]
    out = {}
    for i, upd in engine.stream_batch(conds, settings, points=points, slots=2):
        if upd.done:
            out[i] = upd
    return [out[i] for i in range(len(points))]


def test_a_batch_fits_its_objects_beside_the_decoding_as_a_fit_alone_would(engine, monkeypatch):
    """Fits of a batch run in the worker process while the others decode; each object's result is the fit it gets
    alone. A pool that refuses work (a broken worker) leaves the fit to this process, with the same result."""
    from xspecmesh.decoding import fit_worker

    pts = clouds(3)
    settings = [DecodeSettings(mode="ar", temperature=0.0, max_tokens=90, seed=s, fit=True) for s in (1, 2, 3)]
    want = [engine.generate(p, dataclasses.replace(s)) for p, s in zip(pts, settings)]
    fitted = [w for w in want if w.fitted is not None]
    assert fitted, "no object ended complete with faces: nothing was fitted"
    for broken in (False, True):
        if broken:
            class Refusing:
                def submit(self, *args):
                    raise RuntimeError("a broken pool")

            monkeypatch.setattr(fit_worker, "_POOL", Refusing())
        got = fitted_batch(engine, pts, [dataclasses.replace(s) for s in settings])
        if not broken:  # the worker did the fits
            from concurrent.futures import ProcessPoolExecutor

            assert isinstance(fit_worker._POOL, ProcessPoolExecutor)
        for g, w in zip(got, want):
            assert g.done and g.decoded
            if w.fitted is None:
                assert g.fitted is None
            else:
                np.testing.assert_allclose(g.fitted, w.fitted, atol=1e-5)
                assert g.stats["fit_distance_after"] == w.stats["fit_distance_after"]


@pytest.mark.parametrize("mode", ["ar", "spec"])
def test_candidates_keep_the_closed_or_nearest_of_their_seeds(engine, mode, monkeypatch):
    """candidates = 3: the object is decoded with seeds s, s+1, s+2 in one batch and the result is one of those
    decodes (its tokens as decoding that seed alone gives them), the one ranked best; only it streams triangles."""
    from xspecmesh.decoding import engine as engine_module

    pts = clouds(1)[0]
    s = DecodeSettings(mode=mode, temperature=1.0, max_tokens=90, seed=20, fit=False)
    singles = [alone(engine, pts, dataclasses.replace(s, seed=20 + j))[0] for j in range(3)]
    assert len({tuple(t) for t in singles}) == 3
    asked = []  # candidates are ranked in seed order: put the second one first, whatever its geometry

    def middle_first(tris, stats, points):
        asked.append(len(tris))
        return (len(asked) != 2,)

    monkeypatch.setattr(engine_module, "_candidate_rank", middle_first)
    updates = list(engine.stream(pts, dataclasses.replace(s, candidates=3)))
    assert updates[-1].done and updates[-1].stats["candidate"] == 1 and updates[-1].stats["candidates"] == 3
    assert sum(len(u.tokens) for u in updates) == len(updates[-1].tokens)  # the earlier updates: progress only
    assert updates[-1].tokens == singles[1]
    assert len(updates[-1].triangles) == len(alone(engine, pts, dataclasses.replace(s, seed=21))[1])


def test_candidate_rank_prefers_closed_then_complete_then_near():
    import trimesh

    from xspecmesh.decoding.engine import _candidate_rank
    from xspecmesh.geometry.mesh import sample_surface

    box = trimesh.creation.box((1.0, 0.6, 0.4))
    points = sample_surface(box, 2000, seed=0)
    tight, loose = box.vertices[box.faces], 1.5 * box.vertices[box.faces]
    ranked = sorted([("open", tight[1:], True), ("loose", loose, True), ("tight", tight, True),
                     ("cut", tight, False)], key=lambda c: _candidate_rank(c[1], {"complete": c[2]}, points))
    assert [name for name, *_ in ranked] == ["tight", "loose", "cut", "open"]
