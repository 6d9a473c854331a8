"""Backbone and KV cache: the cached fast path equals the uncached reference exactly (fp32)."""
from __future__ import annotations

import pytest
import torch

from xspecmesh.model.config import ModelConfig, preset
from xspecmesh.errors import SettingsError
from xspecmesh.model.transformer import MeshTransformer

ATOL = 1e-5


def tokens(b=2, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 5121, (b, n), generator=g)
    t[:, 0] = 0  # input position 0 is BOS
    return t


def test_forward_shapes_and_hidden(model, cond):
    logits, hidden = model(tokens(), cond=cond)
    assert logits.shape == (2, 24, 5121) and hidden.shape == (2, 24, model.cfg.dim)
    assert torch.allclose(model.to_logits(hidden), logits)


def test_cached_incremental_equals_full(model, cond):
    t = tokens()
    full, hidden = model(t, cond=cond)
    cache = model.new_cache(cond, 64)
    steps = [model(t[:, i : i + 1], cache=cache) for i in range(t.shape[1])]
    assert torch.allclose(torch.cat([s[0] for s in steps], 1), full, atol=ATOL)
    assert torch.allclose(torch.cat([s[1] for s in steps], 1), hidden, atol=ATOL)
    assert cache.lengths.tolist() == [24, 24]


def test_multi_token_forward_against_cache(model, cond):
    t = tokens()
    full, _ = model(t, cond=cond)
    cache = model.new_cache(cond, 64)
    a, _ = model(t[:, :9], cache=cache)
    b, _ = model(t[:, 9:14], cache=cache)  # a verification-sized block
    c, _ = model(t[:, 14:], cache=cache)
    assert torch.allclose(torch.cat([a, b, c], 1), full, atol=ATOL)


def test_rollback_then_forward_equals_fresh_prefill(model, cond):
    t, other = tokens(seed=0), tokens(seed=1)
    cache = model.new_cache(cond, 64)
    model(t[:, :10], cache=cache)
    model(other[:, 10:16], cache=cache)  # drafts that get rejected
    cache.rollback(torch.tensor([10, 10]))
    after, _ = model(t[:, 10:15], cache=cache)
    fresh = model.new_cache(cond, 64)
    ref, _ = model(t[:, :15], cache=fresh)
    assert torch.allclose(after, ref[:, 10:], atol=ATOL)
    assert torch.allclose(cache.k[:, :, :, :15], fresh.k[:, :, :, :15], atol=ATOL)


def test_ragged_lengths(model, cond):
    """Sequences of different cached lengths share one forward; each sees only its own prefix."""
    t = tokens()
    full, _ = model(t, cond=cond)
    cache = model.new_cache(cond, 64)
    model(t[:, :12], cache=cache)
    cache.rollback(torch.tensor([12, 7]))
    new = torch.stack([t[0, 12:15], t[1, 7:10]])
    out, _ = model(new, cache=cache)
    assert torch.allclose(out[0], full[0, 12:15], atol=ATOL)
    assert torch.allclose(out[1], full[1, 7:10], atol=ATOL)
    assert cache.lengths.tolist() == [15, 10]


def test_a_cache_grows_as_its_sequences_do(model, cond, monkeypatch):
    """A cache that starts with 4 slots grows through single steps, a verification-sized block and ragged rows,
    up to its limit, and computes what a full forward does; a row view (a joining sequence's) may not grow."""
    from xspecmesh.model.kv_cache import KVCache

    monkeypatch.setattr(KVCache, "FIRST_SLOTS", 4)
    t = tokens()
    full, _ = model(t, cond=cond)
    cache = model.new_cache(cond, 24)
    assert cache.k.shape[3] == 4
    steps = [model(t[:, i : i + 1], cache=cache)[0] for i in range(5)]  # 4 -> 8 slots
    cache.rollback(torch.tensor([5, 3]))
    ragged, _ = model(torch.stack([t[0, 5:9], t[1, 3:7]]), cache=cache)  # 9 slots -> 16
    assert cache.k.shape[3] == 16
    rest, _ = model(torch.stack([t[0, 9:], t[1, 7:22]]), cache=cache)  # 24 slots: the limit, not 32
    assert cache.k.shape[3] == 24 and cache.lengths.tolist() == [24, 22]
    assert torch.allclose(torch.cat(steps, 1), full[:, :5], atol=ATOL)
    assert torch.allclose(ragged[0], full[0, 5:9], atol=ATOL) and torch.allclose(ragged[1], full[1, 3:7], atol=ATOL)
    assert torch.allclose(rest[0], full[0, 9:], atol=ATOL) and torch.allclose(rest[1], full[1, 7:22], atol=ATOL)
    small = model.new_cache(cond, 24)
    with pytest.raises(ValueError, match="cannot grow"):
        model(t[:1, :5], cache=small.row(0))


def test_rollback_cannot_grow(model, cond):
    cache = model.new_cache(cond, 16)
    model(tokens(n=4), cache=cache)
    with pytest.raises(ValueError):
        cache.rollback(torch.tensor([5, 5]))


def test_cache_overflow_is_an_error(model, cond):
    cache = model.new_cache(cond, 8)
    with pytest.raises(ValueError, match="longer than the cache"):
        model(tokens(n=9), cache=cache)


def test_equal_lengths_take_their_mask_from_a_pattern_made_once():
    """Sequences of equal lengths (batch 1 always) read their mask as a view of a pattern made once per (n, sees),
    shared by every cache; it is the mask built per forward: every cached key visible, the new tokens causal or as a
    tree's `sees` says."""
    from xspecmesh.model.kv_cache import KVCache, mask_pattern

    mask_pattern.cache_clear()
    cache = KVCache(1, 2, 1, 40, 4, "cpu", torch.float32)
    sees = torch.ones(4, 4, dtype=torch.bool).tril()
    sees[-1, 1:-1] = False  # (a draft tree's sibling: sees the first new token and itself)
    for start, pattern in ((0, None), (9, None), (9, sees), (30, sees), (36, sees)):
        seq_pos = torch.full((2, 1), start) + torch.arange(4)
        at = cache.prepare(seq_pos, pattern)
        new = torch.ones(4, 4, dtype=torch.bool).tril() if pattern is None else pattern
        visible = torch.cat([torch.ones(4, start, dtype=torch.bool), new], 1)
        assert at.upto == start + 4 and at.mask.shape == (2, 1, 4, start + 4)
        assert torch.equal(at.mask[0, 0] == 0, visible) and torch.equal(at.mask[1], at.mask[0])
        shared = mask_pattern(4, pattern, 40, torch.float32, cache.k.device)  # (a window onto it: its storage)
        assert at.mask.untyped_storage().data_ptr() == shared.untyped_storage().data_ptr()
    assert mask_pattern.cache_info().currsize == 2


def test_bos_has_no_position_and_types_are_added(model):
    seq_pos = torch.tensor([[0, 1, 2, 3]])
    t = torch.tensor([[77, 5, 600, 4700]])
    x = model.embed(t, seq_pos)
    assert torch.allclose(x[0, 0], model.bos)
    expected_block = model.token_embed.weight[5] + model.pos_embed.weight[0] + model.type_embed[0]
    expected_special = model.token_embed.weight[4700] + model.pos_embed.weight[2] + model.type_embed[2]
    assert torch.allclose(x[0, 1], expected_block) and torch.allclose(x[0, 3], expected_special)


def test_presets():
    assert preset("tiny").dim == 32
    bpt = preset("bpt")
    assert (bpt.dim, bpt.depth, bpt.heads, bpt.max_seq_len, bpt.vocab_size) == (1024, 24, 16, 10000, 5121)
    assert (bpt.encoder.width, bpt.encoder.depth, bpt.encoder.num_latents, bpt.encoder.num_points) == (768, 8, 257, 4096)
    assert ModelConfig.from_json(bpt.to_json()) == bpt
    preset("tiny").encoder.depth = 99  # presets hand out copies
    assert preset("tiny").encoder.depth == 1
    with pytest.raises(SettingsError, match="unknown preset"):
        preset("huge")


def test_bpt_preset_sizes_on_meta_device():
    with torch.device("meta"):
        m = MeshTransformer(preset("bpt"))
    n = sum(p.numel() for p in m.parameters())
    assert 5.0e8 < n < 6.5e8  # "500M" counts the decoder; the point encoder adds ~60M
    assert m.layers[0].cross_attn.mem_k.shape == (16, 4, 64) and m.layers[0].self_attn.mem_k is None
    assert m.layers[0].ff.proj.weight.shape == (8192, 1024)
