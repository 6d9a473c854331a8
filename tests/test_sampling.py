"""BPT-order sampling and the grammar that keeps every sampled sequence decodable."""
from __future__ import annotations

import pytest
import torch

from xspecmesh.geometry import tokenizer as tok
from xspecmesh.decoding.autoregressive import decode_ar, run_to_end
from xspecmesh.decoding.token_sampling import DONE, START, Grammar, SamplingConfig, distribution, draw, filter_logits

from conftest import tiny_model


def test_top_k_then_top_p_on_raw_logits():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, 3, 1.0)[0, 3:]).all()
    p = logits.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...
    kept = ~torch.isinf(filter_logits(logits, 0, 0.8))[0]
    assert kept.tolist() == [True, True, False, False, False] and p[0] < 0.8 <= p[0] + p[1]
    # temperature is applied after filtering: a low temperature cannot revive a filtered token
    probs = distribution(logits, SamplingConfig(temperature=5.0, top_k=2, top_p=1.0))
    assert probs[0, 2:].sum() == 0 and probs[0, :2].sum().item() == pytest.approx(1.0)


def test_greedy_is_argmax_and_draw_is_seeded():
    logits = torch.randn(4, 50)
    g = distribution(logits, SamplingConfig(temperature=0.0))
    assert (draw(g, None) == logits.argmax(-1)).all()
    p = distribution(logits, SamplingConfig(1.0, 0, 1.0))
    a = draw(p, torch.Generator().manual_seed(3))
    b = draw(p, torch.Generator().manual_seed(3))
    assert (a == b).all()


def test_draw_never_picks_zero_probability():
    p = torch.zeros(1000, 10)
    p[:, 7] = 1.0
    assert (draw(p, torch.Generator().manual_seed(0)) == 7).all()


def test_grammar_accepts_reference_sequences():
    import json
    from pathlib import Path

    grammar = Grammar()
    for f in sorted(Path(__file__).parent.glob("data/reference/bpt_tokens/*.json")):
        tokens = json.loads(f.read_text())["tokens"]
        state = grammar.start(1)
        for t in tokens:
            assert grammar.mask(state)[0, t], f"{f.name}: token {t} refused"
            state = grammar.advance(state, torch.tensor([t]))
        assert grammar.mask(state)[0, tok.EOS], f"{f.name}: EOS refused at the end"


def test_the_grammar_tables_are_built_once_per_device():
    shared = Grammar.on(torch.device("cpu"))
    assert Grammar.on(torch.device("cpu")) is shared
    fresh = Grammar()
    assert torch.equal(shared.allowed, fresh.allowed) and torch.equal(shared.next, fresh.next)


def test_grammar_rules():
    g = Grammar()
    first = g.mask(g.start(1))[0]
    assert first[:512].all() and not first[512:].any()  # the first token is a plain block
    s = g.run([10])
    assert g.allowed[s][512:4608].all() and not g.allowed[s][:512].any()  # an offset must follow a block
    s = g.run([10, 600, 700])  # two vertices: no patch end yet
    assert not g.allowed[s][tok.EOS] and not g.allowed[s][4608:5120].any()
    s = g.run([10, 600, 700, 800])
    assert g.allowed[s][tok.EOS] and g.allowed[s][4608:5120].all()
    s = g.run([10, 600, 700, 800, 4700, 900])  # after a patch centre the next vertex re-emits its block
    assert not g.allowed[s][512:4608].any() and g.allowed[s][:512].all()
    assert g.run([10, 600, 700, 800, tok.EOS]) == DONE and g.run([]) == START
    assert g.run([600]) == DONE and g.run([10, 11]) == DONE  # a forbidden token (never drawn under the mask) ends it


def test_100_sampled_sequences_decode_to_valid_triangles():
    model = tiny_model()
    torch.manual_seed(0)
    with torch.no_grad():
        cond = model.encode(torch.randn(100, model.cfg.encoder.num_points, 6))
    seqs = run_to_end(decode_ar(model, cond, SamplingConfig(1.0, 50, 0.95), 60, torch.Generator().manual_seed(0)), 100)
    for seq in seqs:
        tris = tok.decode(seq)
        assert len(tris) > 0
        assert ((tris >= 0) & (tris < 128)).all()
        # every token was legal where it stands
        assert Grammar().run(seq) != DONE or not seq
