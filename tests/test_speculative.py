"""Speculative decoding: every acceptance rule against plain AR decoding on tiny random models."""
from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest
import torch

import xspecmesh.decoding.speculative as speculative
from xspecmesh.geometry import tokenizer as tok
from xspecmesh.model.config import HeadsConfig, preset
from xspecmesh.decoding.autoregressive import DecodeStats, decode_ar, run_to_end, token_limit
from xspecmesh.model.transformer import MeshTransformer
from xspecmesh.model.heads import DraftHeads
from xspecmesh.decoding.token_sampling import SamplingConfig
from xspecmesh.decoding.speculative import AcceptConfig, decode_speculative

from conftest import tiny_heads, tiny_model

GREEDY = SamplingConfig(temperature=0.0)


def condition(model, b=1, seed=5):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.encode(torch.randn(b, model.cfg.encoder.num_points, 6))


def ar(model, cond, sampling, n, seed=0):
    return run_to_end(decode_ar(model, cond, sampling, n, torch.Generator().manual_seed(seed)), cond.shape[0])


def spec(model, heads, cond, sampling, rule, n, d=4, seed=0, stats=None, tree=False, confidence=0.0):
    steps = decode_speculative(model, heads, cond, sampling, rule, d, n, torch.Generator().manual_seed(seed), stats,
                               tree=tree, confidence=confidence)
    return run_to_end(steps, cond.shape[0])


class OracleHeads:
    """Drafts the backbone's own future greedy tokens: what perfectly trained heads would propose."""

    def __init__(self, future: list[int]):
        self.future, self.pos, self.num_heads, self.taps = future, 0, 8, ()

    def begin(self, model, cond, max_len):
        return None

    def propose(self, model, ctx, feats, tokens, counts, drafts, walk):
        out = []
        for k in range(drafts):
            logits = torch.full((1, 5121), -1e4)
            if self.pos + k < len(self.future):
                logits[0, self.future[self.pos + k]] = 0.0
            out.append(walk.best(logits))
        return torch.stack(out, 1) if out else torch.zeros(1, 0, dtype=torch.long)


@pytest.mark.parametrize("d, tree", [(1, False), (3, False), (6, False), (1, True), (4, True)])
def test_greedy_speculative_equals_greedy_ar_with_untrained_heads(d, tree):
    model = tiny_model(sharpen=30.0)
    cond = condition(model, b=3)
    want = ar(model, cond, GREEDY, 150)
    stats = DecodeStats()
    got = spec(model, tiny_heads(model, d=6), cond, GREEDY, AcceptConfig("greedy"), 150, d=d, stats=stats, tree=tree)
    assert got == want
    assert sum(stats.accept_hist) > 0 and stats.scr >= 1.0
    assert (stats.alternatives > 0) == tree  # with the tree, some steps kept the runner-up
    # A kept alternative is a step that kept one token where d1 was rejected: it counts as a trial of head 1, not an
    # acceptance, and the drafts after d1 (verified on the dropped branch) are not trials of later heads.
    assert sum(stats.accept_hist[1:]) == stats.head_accepts[0] + stats.alternatives
    assert all(stats.head_trials[k + 1] == stats.head_accepts[k] for k in range(d - 1))


@pytest.mark.parametrize("shared", [True, False])
def test_untrained_heads_predict_what_the_backbone_predicts_next(shared):
    model = tiny_model()
    heads = DraftHeads.for_backbone(model, HeadsConfig(num_heads=3, shared_output=shared)).eval()
    cond = condition(model)
    with torch.no_grad():
        logits, hidden = model(torch.zeros(1, 1, dtype=torch.long), cond=cond)
        drafts = heads(hidden, heads.context(cond), model.to_logits)
    assert torch.allclose(drafts, logits[:, :, None].expand_as(drafts), atol=1e-5)


def test_oracle_heads_reach_scr_near_d_plus_one():
    model = tiny_model(sharpen=30.0)
    cond = condition(model)
    want = ar(model, cond, GREEDY, 300)[0]
    oracle = OracleHeads(want)
    stats = DecodeStats()
    got = []
    for accepted in decode_speculative(model, oracle, cond, GREEDY, AcceptConfig("greedy"), 4, 300, None, stats):
        got.extend(accepted[0])
        oracle.pos = len(got)
    assert got == want
    assert stats.scr > 4.5  # D + 1 = 5 tokens per step, less the prefill and the tail
    assert stats.accept_hist[4] >= stats.steps - 3


@pytest.mark.parametrize("tree", [False, True])
def test_threshold_delta_one_reproduces_ar_sampling(tree):
    model = tiny_model(sharpen=30.0)
    cond = condition(model, b=2)
    sampling = SamplingConfig(0.8, 20, 1.0)  # (a top-p cut can flip on float noise between batched and single forwards)
    want = ar(model, cond, sampling, 200, seed=11)
    stats = DecodeStats()
    got = spec(model, tiny_heads(model), cond, sampling, AcceptConfig("threshold", delta=1.0), 200, seed=11,
               stats=stats, tree=tree)
    assert got == want
    assert stats.accept_hist[0] == sum(stats.accept_hist)  # no draft was ever accepted


def step_lengths(steps) -> list[int]:
    """Tokens each step of a one-sequence decode yielded."""
    return [len(accepted[0]) for accepted in steps]


def test_threshold_delta_zero_accepts_every_draft():
    # Drafts are grammar-masked, so all are grammatical; at delta 0 each step keeps its D drafts plus one token.
    model = tiny_model(sharpen=30.0)
    cond = condition(model)
    sampling = SamplingConfig(0.8, 20, 0.95)
    steps = decode_speculative(model, tiny_heads(model), cond, sampling, AcceptConfig("threshold", 0.0), 4, 200,
                               torch.Generator().manual_seed(0))
    lengths = step_lengths(steps)
    assert lengths[0] == 1 and len(lengths) > 10  # the prefill's first token
    assert set(lengths[1:-1]) == {5} and 1 <= lengths[-1] <= 5 and sum(lengths) == 200  # the limit cuts the last


def test_topk_rule_accepts_only_top_k_tokens():
    model = tiny_model(sharpen=30.0)
    cond = condition(model)
    heads = tiny_heads(model)
    # K = 1 under greedy sampling is the greedy rule: one accepted draft off the backbone's top token would make the
    # result differ from greedy AR.
    stats = DecodeStats()
    assert spec(model, heads, cond, GREEDY, AcceptConfig("topk", topk=1), 150, stats=stats) == ar(model, cond, GREEDY,
                                                                                                   150)
    assert sum(stats.head_accepts) < sum(stats.head_trials)  # some drafts were off the top token and rejected
    # K = the whole vocabulary accepts every (grammatical) draft.
    steps = decode_speculative(model, heads, cond, SamplingConfig(0.8, 20, 0.95), AcceptConfig("topk", topk=5121), 4,
                               120, torch.Generator().manual_seed(0))
    lengths = step_lengths(steps)
    assert set(lengths[1:-1]) == {5} and sum(lengths) == 120


@pytest.mark.parametrize("tree", [False, True])
def test_cache_equals_fresh_prefill_after_every_step(tree):
    """Also with the draft tree, whose kept alternative is moved to the slot after r."""
    model = tiny_model(sharpen=30.0)
    cond = condition(model, b=2)
    heads = tiny_heads(model)
    cache = model.new_cache(cond, 400)
    seqs = [[], []]
    stats = DecodeStats()
    steps = decode_speculative(model, heads, cond, SamplingConfig(0.8, 20, 0.95), AcceptConfig("threshold", 0.3), 4,
                               120, torch.Generator().manual_seed(2), stats, cache, tree=tree)
    checked = 0
    for accepted in steps:
        for s, a in zip(seqs, accepted):
            s.extend(a)
        for b in range(2):
            if len(seqs[b]) < 2 or cache.lengths[b] != len(seqs[b]):
                continue  # finished sequences keep their cache frozen
            # the cache holds BOS + every accepted token but the newest (fed at the next step)
            fresh = model.new_cache(cond[b : b + 1], 400)
            inp = torch.tensor([[0] + seqs[b][:-1]])
            model(inp, cache=fresh)
            n = int(cache.lengths[b])
            assert torch.allclose(cache.k[:, b, :, :n], fresh.k[:, 0, :, :n], atol=1e-5)
            assert torch.allclose(cache.v[:, b, :, :n], fresh.v[:, 0, :, :n], atol=1e-5)
            checked += 1
    assert checked > 10
    assert (stats.alternatives > 0) == tree


@pytest.mark.parametrize("kind", ["cross", "eagle"])
def test_a_confidence_stop_drafts_fewer_and_keeps_greedy_identity(kind):
    model = tiny_model(sharpen=30.0)
    cond = condition(model, b=2)
    stats = DecodeStats()
    heads = tiny_heads(model, d=4, kind=kind)
    steps = decode_speculative(model, heads, cond, GREEDY, AcceptConfig("greedy"), 4, 150, None, stats,
                               confidence=0.99)
    assert run_to_end(steps, 2) == ar(model, cond, GREEDY, 150)
    assert stats.draft_hist[1] > 0  # (untrained drafters are never that sure: their chains end at the first draft)


def test_the_walk_ends_the_chain_only_when_every_sequence_doubts_its_draft():
    from xspecmesh.decoding.token_sampling import HAVE_3, NEED_3, DraftWalk, Grammar

    walk = DraftWalk(Grammar(), torch.tensor([HAVE_3, NEED_3]), confidence=0.5)
    sure, unsure = torch.full((tok.VOCAB_SIZE,), -50.0), torch.zeros(tok.VOCAB_SIZE)
    sure[tok.OFFSET_BASE + 7] = 50.0  # (an offset: allowed in both states)
    walk.best(torch.stack([sure, unsure]))
    assert not walk.done  # one sequence is sure of its draft: the chain goes on
    walk.best(torch.stack([unsure, unsure]))
    assert walk.done


def test_the_walk_keeps_a_runner_up_only_where_the_first_draft_is_doubted():
    from xspecmesh.decoding.token_sampling import HAVE_3, DraftWalk, Grammar

    walk = DraftWalk(Grammar(), torch.tensor([HAVE_3, HAVE_3, HAVE_3]), branch=True)
    sure, unsure, torn = torch.full((3, tok.VOCAB_SIZE), -50.0)
    sure[tok.OFFSET_BASE + 7], sure[tok.OFFSET_BASE + 9] = 50.0, 40.0  # (first choice ~1 - e^-10)
    unsure[tok.OFFSET_BASE + 7], unsure[tok.OFFSET_BASE + 9] = 1.0, 0.0  # (0.73)
    torn[tok.OFFSET_BASE + 7], torn[tok.OFFSET_BASE + 9] = 0.1, 0.0  # (0.52)
    assert walk.best(torch.stack([sure, unsure, torn])).tolist() == [tok.OFFSET_BASE + 7] * 3
    assert walk.alternative.tolist() == [-1, -1, tok.OFFSET_BASE + 9]  # (0.7 is the line)
    walk.best(torch.stack([torn, torn, torn]))
    assert walk.alternative.tolist() == [-1, -1, tok.OFFSET_BASE + 9]  # (the first draft's only)


def first_tokens(seqs, n=4):
    return collections.Counter(tuple(s[:n]) for s in seqs)


def total_variation(a: collections.Counter, b: collections.Counter) -> float:
    na, nb = sum(a.values()), sum(b.values())
    return 0.5 * sum(abs(a[k] / na - b[k] / nb) for k in set(a) | set(b))


@pytest.mark.parametrize("kind, output, n, d, floor, tree, confidence", [("cross", "shared", 3, 2, 0.06, False, 0.0),
                                                                        ("eagle", "factored", 4, 3, 0.08, False, 0.0),
                                                                        ("cross", "shared", 3, 2, 0.06, True, 0.0),
                                                                        ("cross", "shared", 3, 2, 0.06, True, 0.3)])
def test_exact_rule_preserves_the_sampling_distribution(kind, output, n, d, floor, tree, confidence):
    """Over 2000 samples the joint law of the first n tokens matches plain sampling, with the paper's heads and with
    a draft decoder (whose drafts read the tokens before them), with the draft tree's alternative first draft and
    with chains ended by the confidence stop; accepting every draft (a wrong rule) is far off, which shows the bound
    has power."""
    model = tiny_model(sharpen=8.0)
    sampling = SamplingConfig(1.0, 3, 1.0)
    cond = condition(model).expand(2000, -1, -1).contiguous()
    heads = tiny_heads(model, kind=kind, output=output)
    plain = first_tokens(ar(model, cond, sampling, n, seed=1), n)
    plain2 = first_tokens(ar(model, cond, sampling, n, seed=2), n)
    stats = DecodeStats()
    exact = first_tokens(spec(model, heads, cond, sampling, AcceptConfig("exact"), n, d=d, seed=3, stats=stats,
                              tree=tree, confidence=confidence), n)
    assert (stats.alternatives > 100) == tree
    wrong = first_tokens(spec(model, heads, cond, sampling, AcceptConfig("threshold", 0.0), n, d=d, seed=3), n)
    noise = total_variation(plain, plain2)
    assert total_variation(plain, exact) < max(floor, 2.5 * noise)
    assert total_variation(plain, wrong) > 0.2


class _Ticks:
    """A clock for the decode loop that advances 1 ms per reading: every step then costs the same whatever its D, so
    adaptive D's choices follow acceptance alone, not the test machine's timing noise."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1e-3
        return self.now


def test_adaptive_draft_length_keeps_every_guarantee(monkeypatch):
    """Adaptive D changes only how many drafts a step verifies: greedy stays token-identical to AR, δ = 1 stays
    AR sampling, and oracle drafts keep the draft length at its maximum."""
    monkeypatch.setattr(speculative, "time", _Ticks())
    model = tiny_model(sharpen=30.0)
    cond = condition(model, b=2)
    heads = tiny_heads(model, d=6)
    greedy = decode_speculative(model, heads, cond, GREEDY, AcceptConfig("greedy"), 6, 150, None, adaptive=True)
    assert run_to_end(greedy, 2) == ar(model, cond, GREEDY, 150)
    sampling = SamplingConfig(0.8, 20, 1.0)
    stats = DecodeStats()
    steps = decode_speculative(model, heads, cond, sampling, AcceptConfig("threshold", 1.0), 6, 150,
                               torch.Generator().manual_seed(4), stats, adaptive=True)
    assert run_to_end(steps, 2) == ar(model, cond, sampling, 150, seed=4)
    assert stats.draft_hist[0] > sum(stats.draft_hist) / 2  # useless heads: mostly plain AR steps

    single = condition(model)
    want = ar(model, single, GREEDY, 200)[0]
    oracle, got, stats = OracleHeads(want), [], DecodeStats()
    for accepted in decode_speculative(model, oracle, single, GREEDY, AcceptConfig("greedy"), 4, 200, None, stats,
                                       adaptive=True):
        got.extend(accepted[0])
        oracle.pos = len(got)
    assert got == want and stats.draft_hist[4] > 0.8 * sum(stats.draft_hist)


def test_draft_length_choice():
    from xspecmesh.decoding.adaptive import DraftLength

    def choices(accepts: bool) -> list[int]:
        chooser, out = DraftLength(4), []
        for _ in range(40):
            out.append(chooser.choose())
            chooser.update(out[-1], [out[-1] if accepts else 0] * 2, 1.0 + 0.3 * out[-1])
        return out

    # Heads that are never accepted: after one more short try (one rejection does not outweigh the prior), plain AR
    # steps, with probes of the full length 16 steps after the first, then 32 after that (plain steps still best).
    never = choices(False)
    assert never[:2] == [4, 1] and [i for i, d in enumerate(never) if d == 4] == [0, 16] and set(never[2:16]) == {0}
    chooser = DraftLength(4)
    for _ in range(300):
        d = chooser.choose()
        chooser.update(d, [0] * 2, 1.0 + 0.3 * d)
    assert chooser.interval == chooser.max_probe_every == 64  # the interval doubles up to its cap
    for _ in range(64):  # the heads become perfect: the next probe finds drafts worth it and probes often again
        d = chooser.choose()
        chooser.update(d, [d] * 2, 1.0 + 0.3 * d)
    assert chooser.interval == 16 and chooser.best() == 4
    always = choices(True)  # heads always accepted: longer and longer drafts, then the full length throughout
    assert always[0] == 4 and always[1:] == sorted(always[1:16]) + [4] * 24 and always[1] >= 2


def test_draft_length_counts_only_drafts_verified_as_continuations():
    """A sequence that kept the draft tree's alternative yielded a token at d1's place (head 1 counts as accepted for
    the yield) but says nothing of head 2: its d2 was verified on the branch it dropped."""
    from xspecmesh.decoding.adaptive import DraftLength

    tree, chain = DraftLength(4), DraftLength(4)
    tree.update(4, [1, 1], 1.0, verified=[1, 1])
    chain.update(4, [1, 1], 1.0)  # (default: d2 verified after an accepted d1, and rejected)
    assert tree.accept[0] == chain.accept[0] > 0.5
    assert tree.observed[1] == 0 and tree.accept[1] == 0.5 and chain.accept[1] < 0.5


def test_draft_length_cost_is_not_set_by_one_slow_step():
    """A D measured for the first time starts from the line through the others: one slow step at a rarely chosen D
    (a page fault, another process) moves its estimate, and through the line every D's, by a fraction only."""
    from xspecmesh.decoding.adaptive import DraftLength

    chooser = DraftLength(4)
    for _ in range(20):
        for d in (0, 4):
            chooser.update(d, [d], 1.0 + 0.2 * d)
    assert chooser.cost() == pytest.approx([1.0, 1.2, 1.4, 1.6, 1.8], rel=0.02)
    chooser.update(1, [0], 10.0)  # one slow step at D = 1, ~8x its cost
    assert chooser.cost()[0] < 1.5 and chooser.cost()[1] < 4.5
    for _ in range(40):  # steady steps at D = 1 take over
        chooser.update(1, [1], 1.2)
    assert chooser.seconds[1] == pytest.approx(1.2, abs=0.1)


def test_each_decode_probes_first_and_weighs_its_own_acceptance():
    """A chooser that one object drove to plain steps (no draft accepted, probes backed off to every 64 steps) probes
    at the next decode's first step and follows that object's acceptance within a few steps; without `begin` it
    would keep plain steps until its next rare probe."""
    from xspecmesh.decoding.adaptive import DraftLength

    def next_object(begin: bool) -> list[int]:
        chooser = DraftLength(4)
        for _ in range(300):
            d = chooser.choose()
            chooser.update(d, [0], 1.0 + 0.2 * d)
        assert chooser.best() == 0 and chooser.interval == 64
        if begin:
            chooser.begin()
        out = []
        for _ in range(20):  # an object whose drafts are all accepted
            out.append(chooser.choose())
            chooser.update(out[-1], [out[-1]], 1.0 + 0.2 * out[-1])
        return out

    fresh, stale = next_object(True), next_object(False)
    assert fresh[0] == 4 and 0 not in fresh and fresh[-8:] == [4] * 8
    assert stale[:4] == [0] * 4 and stale.count(0) > 10


def test_an_engine_keeps_its_draft_length_estimates_across_requests(tmp_path):
    """Adaptive D learns across meshes: the same engine and settings hand the decoder the same chooser, which
    keeps what earlier requests measured; another rule or batch size gets its own."""
    from xspecmesh.decoding.adaptive import DraftLength
    from xspecmesh.decoding.engine import DecodeSettings, Engine
    from xspecmesh.model.checkpoint import write_random_checkpoint

    engine = Engine.load(str(write_random_checkpoint(tmp_path / "t.safetensors", "tiny", heads=4)), "cpu")
    points = np.random.default_rng(0).normal(size=(300, 6)).astype(np.float32)
    used = []
    real = speculative.decode_speculative

    def spy(*args, adaptive, **kw):
        used.append((adaptive, adaptive.steps))  # the chooser, and the steps it had chosen before this request
        return real(*args, adaptive=adaptive, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("xspecmesh.decoding.engine.decode_speculative", spy)
        s = DecodeSettings(mode="spec", heads=4, adaptive=True, max_tokens=30, fit=False)
        for settings in (s, dataclasses.replace(s, seed=1), dataclasses.replace(s, accept="greedy")):
            engine.generate(points, settings)
    (first, before_first), (second, before_second), (greedy, before_greedy) = used
    assert all(isinstance(c, DraftLength) for c, _ in used)
    assert second is first and before_first == 0 < before_second  # the second request went on from the first's
    assert greedy is not first and before_greedy == 0


def uneven_accepts(monkeypatch):
    """Row 0 accepts every draft, row 1 none (a well-drafted mesh and a hard one in one batch)."""
    def forced(rule, logits, probs, drafts, generator, alternative=None):
        n = [drafts.shape[1], 0]
        return n, probs[torch.arange(2), torch.tensor(n)], [False, False]

    monkeypatch.setattr(speculative, "accept_drafts", forced)


@pytest.mark.parametrize("kind, d, max_seq_len", [("cross", 4, None), ("eagle", 4, None), ("eagle", 8, 47)])
def test_a_row_past_the_limit_leaves_room_for_the_others(monkeypatch, kind, d, max_seq_len):
    """A row that reaches max_tokens in a step accepting several drafts, while another goes on: the finished row
    still goes through every later verify, so both caches must stay within their size (also at the model's own
    token limit with the most heads, where the backbone's cache is as long as it may be)."""
    uneven_accepts(monkeypatch)
    model = tiny_model(sharpen=30.0)
    if max_seq_len:
        torch.manual_seed(0)
        model = MeshTransformer(dataclasses.replace(preset("tiny"), max_seq_len=max_seq_len)).eval()
    with torch.no_grad():
        model.to_logits.bias[tok.EOS] -= 1e4  # no EOS: both rows run to the limit
    cond = condition(model, b=2)
    limit = token_limit(model, 38)  # 38 either way; 47 - MAX_HEADS - 1 for the short model
    steps = decode_speculative(model, tiny_heads(model, d=d, kind=kind), cond, SamplingConfig(0.8, 20, 1.0),
                               AcceptConfig("threshold", 0.02), d, limit, torch.Generator().manual_seed(0))
    seqs = run_to_end(steps, 2)
    assert [len(s) for s in seqs] == [limit, limit]


def test_a_finished_row_feeds_the_drafter_nothing():
    """The eagle drafter's own cache stays put for a row that has finished (here, finished from the start)."""
    model = tiny_model(sharpen=30.0)
    cond = condition(model, b=2)
    drafter = tiny_heads(model, d=4, kind="eagle", output="factored")
    contexts = []
    begin = drafter.begin

    def recording_begin(*args):
        contexts.append(begin(*args))
        return contexts[-1]

    drafter.begin = recording_begin
    finished = torch.tensor([True, False])
    steps = decode_speculative(model, drafter, cond, SamplingConfig(0.8, 20, 1.0), AcceptConfig("greedy"), 4, 60,
                               torch.Generator().manual_seed(3), finished=finished)
    seqs = run_to_end(steps, 2)
    assert seqs[0] == [] and len(seqs[1]) == 60
    assert contexts[0].lengths[0] == 1  # the pair fed with the prefill's token, nothing after



def test_steps_without_drafts_pass_their_pairs_to_the_next_drafting_step(monkeypatch):
    """A step that drafts nothing (adaptive D = 0) does not run the drafter; the pairs it commits reach the drafter at
    the next step that drafts, so a draft decoder has then read exactly one pair per token emitted so far."""
    from xspecmesh.decoding.adaptive import DraftLength

    model = tiny_model(sharpen=30.0)
    with torch.no_grad():
        model.to_logits.bias[tok.EOS] -= 1e4  # both rows run to the limit
    cond = condition(model, b=2)
    drafter = tiny_heads(model, d=4, kind="eagle", output="factored")
    lengths = iter([4, 0, 0, 2, 0, 3, 0, 0, 0, 1] * 20)
    monkeypatch.setattr(DraftLength, "choose", lambda self: next(lengths))
    emitted, seen, propose = [0, 0], [], drafter.propose

    def spy(model, ctx, feats, tokens, counts, drafts, walk):
        out = propose(model, ctx, feats, tokens, counts, drafts, walk)
        seen.append((drafts, ctx.lengths.tolist(), list(emitted)))
        return out

    monkeypatch.setattr(drafter, "propose", spy)
    for accepted in decode_speculative(model, drafter, cond, SamplingConfig(0.8, 20, 1.0),
                                       AcceptConfig("threshold", 0.0), 4, 80, torch.Generator().manual_seed(2),
                                       adaptive=True):
        emitted = [e + len(a) for e, a in zip(emitted, accepted)]
    assert len(seen) > 5 and all(drafts > 0 for drafts, _, _ in seen)  # never called for a step without drafts
    assert all(read == sent for _, read, sent in seen[:-1])  # every committed pair read once, none lost


def test_append_pairs_keeps_each_rows_own_pairs_in_order():
    f0, t0, c0 = torch.arange(6.0).view(2, 3, 1), torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([2, 0])
    f1, t1, c1 = torch.arange(10.0, 14.0).view(2, 2, 1), torch.tensor([[7, 8], [9, 10]]), torch.tensor([1, 2])
    feats, tokens, counts = speculative._append_pairs((f0, t0, c0), (f1, t1, c1))
    assert counts.tolist() == [3, 2]
    assert tokens[0].tolist() == [1, 2, 7] and tokens[1, :2].tolist() == [9, 10]
    assert feats[0, :, 0].tolist() == [0.0, 1.0, 10.0] and feats[1, :2, 0].tolist() == [12.0, 13.0]
