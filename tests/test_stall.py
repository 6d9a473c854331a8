"""A decode stuck in a loop (tokens that complete no face) is stopped after `STALL_TOKENS` of them, at the same token
in every decoder, with the faces made so far. Tiny random models; no timings."""
from __future__ import annotations

import numpy as np
import pytest

from xspecmesh.decoding import engine as engine_mod
from xspecmesh.decoding.engine import DecodeSettings, Engine, Decoded
from xspecmesh.geometry import tokenizer as tok
from xspecmesh.model.checkpoint import write_random_checkpoint

OFF = tok.OFFSET_BASE


def test_a_loop_is_cut_where_it_has_made_no_face_for_stall_tokens():
    # a patch of three faces (centre, then a fan of four vertices), then one vertex over and over: no new face
    fan = [tok.SPECIAL_BASE + 9, OFF + 1, OFF + 2, OFF + 300, OFF + 700, OFF + 3000]
    loop = [OFF + 3000] * (engine_mod.STALL_TOKENS + 10)
    mesh = Decoded(None, limit=1000)
    kept, tris = mesh.add(fan)
    assert kept == fan and len(tris) == mesh.faces == 3 and not mesh.stalled
    kept, tris = mesh.add(loop[:40])  # a step that stays under the stall
    assert len(kept) == 40 and len(tris) == 0 and not mesh.stopped
    kept, tris = mesh.add(loop[40:])  # one step that crosses it: cut at the stall's last token
    assert len(mesh.tokens) == len(fan) + engine_mod.STALL_TOKENS and len(tris) == 0 and mesh.faces == 3
    assert mesh.stalled and mesh.stopped and mesh.final() == {"complete": False, "stalled": True}


def test_a_face_resets_the_count():
    mesh = Decoded(None, limit=10_000)
    for block in (1, 2, 3):  # each patch's one face comes at its last token, just under the stall
        mesh.add([tok.SPECIAL_BASE + block] + [OFF + 5] * (engine_mod.STALL_TOKENS - 3) + [OFF + 6, OFF + 7])
    assert not mesh.stalled and mesh.faces == 3 and mesh.final() == {"complete": True, "stalled": False}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "t.safetensors"
    return Engine.load(str(write_random_checkpoint(path, "tiny", heads=4, head_kind="eagle")), "cpu")


def test_every_decoder_stops_a_stall_at_the_same_token(engine, monkeypatch):
    """A random model stalls often at a short stall: AR and greedy speculative decoding (token-identical) stop at
    the same token, alone and in a batch, and say so."""
    monkeypatch.setattr(engine_mod, "STALL_TOKENS", 6)
    rng = np.random.default_rng(2)
    points = [np.concatenate([x := rng.normal(size=(256, 3)), x / np.linalg.norm(x, axis=1, keepdims=True)],
                             1).astype(np.float32) for _ in range(4)]
    stalled = 0
    for mode, extra in (("ar", {}), ("spec", dict(heads=3, accept="greedy"))):
        settings = [DecodeSettings(mode=mode, temperature=0.0, max_tokens=200, seed=0, fit=False, **extra)
                    for _ in points]
        alone = [engine.generate(p, s) for p, s in zip(points, settings)]
        together = {i: [] for i in range(4)}
        last = {}
        for i, upd in engine.stream_batch([engine.condition(p, s.seed) for p, s in zip(points, settings)], settings,
                                          slots=2):
            together[i] += upd.tokens
            last[i] = upd.stats
        for i, res in enumerate(alone):
            assert together[i] == res.tokens and last[i]["stalled"] == res.stats["stalled"]
            if res.stats["stalled"]:
                stalled += 1
                detok = tok.IncrementalDetokenizer()
                made = [len(detok.push(t)) for t in res.tokens]
                assert not res.stats["complete"] and len(res.tokens) < 200
                assert sum(made[-6:]) == 0 and (len(made) == 6 or made[-7] > 0)  # (a face just before the six)
        if mode == "ar":
            ar = [r.tokens for r in alone]
        else:
            assert [r.tokens for r in alone] == ar
    assert stalled >= 2  # (in both decoders, objects stalled: this model and these clouds stall two of four)


def test_the_fit_skips_a_stalled_mesh_and_says_why():
    from xspecmesh.geometry.fit import fit_result

    tris = np.random.default_rng(0).normal(size=(4, 3, 3)).astype(np.float32)
    fitted, stats = fit_result(tris, np.zeros((64, 6), np.float32), {"complete": False, "stalled": True})
    assert fitted is None and "stalled" in stats["fit_skipped"]


def test_the_backbones_own_samples_for_training_are_cut_where_a_decode_would_stall(monkeypatch):
    """A drafter trains on the sequences decoding keeps: a sample is cut where it stalls, and did not end there."""
    import torch

    from conftest import tiny_model
    from xspecmesh.training.trainer import own_sequences

    model = tiny_model()
    cond = model.encode(torch.randn(4, model.cfg.encoder.num_points, 6, generator=torch.Generator().manual_seed(0)))
    full = own_sequences(model, cond, 60, torch.Generator().manual_seed(1))  # (no stall of 128 tokens within 60)
    monkeypatch.setattr(engine_mod, "STALL_TOKENS", 5)
    cut = own_sequences(model, cond, 60, torch.Generator().manual_seed(1))
    shorter = 0
    for f, c in zip(full, cut):
        assert f.tokens[: len(c.tokens)].tolist() == c.tokens.tolist()  # the same decode, cut or not
        if len(c.tokens) < len(f.tokens):
            shorter += 1
            stall = engine_mod.Decoded(None, len(f.tokens))
            assert not c.ended and (stall.add(f.tokens.tolist())[0], stall.stalled) == (c.tokens.tolist(), True)
    assert shorter  # a random model stalls within 5 tokens somewhere
