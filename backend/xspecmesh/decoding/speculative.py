"""XSpecMesh multi-head speculative decoding (arXiv 2507.23777), read top to bottom like the paper:

    draft   the drafter proposes the next D tokens (greedy, grammar-masked): the paper's D heads read the backbone's
            last hidden state; our draft decoders (model/drafter.py) also read the tokens fixed before each draft
    verify  one backbone forward over [r, d1..dD] against the KV cache gives p_0..p_D
    accept  keep the longest prefix d1..da that the acceptance rule admits
    resample the first rejected position from the backbone (or take a bonus token from p_D when all are accepted)
    commit  roll the cache back to the accepted length and stream r, d1..da

`r` is the token sampled last and not yet fed to the backbone. Acceptance rules:
    threshold  accept while p(x) > δ (the paper; δ = 0 accepts every grammatical draft)
    exact      accept with probability p(x), else resample from p without x: lossless, the output distribution is
               plain sampling's, since the drafts are deterministic
    greedy     accept iff x = argmax p: token-identical to greedy AR decoding
    topk       accept if x is among the backbone's K most likely tokens (the paper's ablation)

Ours, both deterministic functions of the drafter's outputs, so the rules keep their guarantees: the chain ends
early after a draft the drafter doubts (`confidence`), and where it doubts d1 its runner-up is verified in the same
forward as a sibling of d1 and kept where d1 is rejected (`tree`; see `accept_drafts` and `DraftWalk`).
"""
from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from xspecmesh.geometry import tokenizer as tok
from xspecmesh.decoding.adaptive import DraftLength
from xspecmesh.decoding.autoregressive import DecodeStats, Join, Leaving, restart_slots, token_limit
from xspecmesh.decoding.settings_schema import MAX_HEADS, SETTINGS
from xspecmesh.model.drafter import Drafter
from xspecmesh.model.kv_cache import KVCache
from xspecmesh.model.transformer import MeshTransformer
from xspecmesh.decoding.token_sampling import DraftWalk, Grammar, SamplingConfig, distribution, draw, uniform

RULES = SETTINGS["accept"].values


@dataclass
class AcceptConfig:
    rule: str = "threshold"
    delta: float = 0.5  # threshold rule
    topk: int = 5  # topk rule


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def accept_drafts(rule: AcceptConfig, logits, probs, drafts, generator, alternative=None):
    """How many leading drafts each sequence keeps (list of B), the distribution its next token is drawn from (B, V),
    and whether it kept the alternative first draft instead (list of B; then 1 draft is kept).

    logits/probs: (B, D+1, V) masked backbone logits and sampling distributions at [r, d1..dD], then with an
    `alternative` (B,) (a second candidate for d1; -1: none) one more row, at the alternative; drafts: (B, D). The
    alternative is tried where d1 is rejected, by the same rule against what is left of the distribution at r (for
    `exact`: d1 removed, so that every token keeps the probability plain sampling gives it). The numbers each rule
    tests are gathered in one go and decided on the host: a few numbers per sequence, where the same decisions as
    tensor ops took some twenty small ops, each of which costs on a CPU right after a verify has swept its caches."""
    b, d = drafts.shape
    rows = torch.arange(b, device=drafts.device)

    def next_distribution(at: list[int]):  # (greedy: `probs` are one-hot at the argmax, sampling at temperature 0)
        return probs[rows, torch.tensor(at, device=drafts.device)]

    if d == 0:  # (a step without drafts: adaptive D = 0) nothing to accept, the next token is drawn at r
        return [0] * b, probs[:, 0], [False] * b
    # The tokens tested, d1..dD and the alternative, and the row of logits/probs each is tested against.
    alt = alternative.tolist() if alternative is not None else [-1] * b
    tested = drafts if alternative is None else torch.cat([drafts, alternative.clamp(min=0)[:, None]], 1)
    at = _tested_rows(d, alternative is not None, drafts.device)
    if rule.rule == "greedy":
        best = logits.argmax(-1).gather(1, at.expand(b, -1))
        ok = (tested == best).tolist()
    elif rule.rule == "topk":
        ok = (logits[:, at[0]].topk(rule.topk, dim=-1).indices == tested[..., None]).any(-1).tolist()
    elif rule.rule in ("threshold", "exact"):
        p = probs.flatten(1).gather(1, tested + at * probs.shape[-1]).tolist()
        if rule.rule == "threshold":
            ok = [[x > rule.delta or rule.delta <= 0 for x in row] for row in p]
        else:  # accept with probability p(x)
            u = uniform((b, d + (alternative is not None)), generator, probs.device, probs.dtype).tolist()
            ok = []
            for us, ps in zip(u, p):
                ok.append([ui < pi for ui, pi in zip(us[:d], ps)])
                if len(ps) > d:  # the alternative: against the rest of the distribution at r, d1 removed
                    ok[-1].append(us[d] * (1 - ps[0]) < ps[d])
    else:
        raise ValueError(f"unknown acceptance rule {rule.rule!r}")
    n_acc = [row[:d].index(False) if False in row[:d] else d for row in ok]
    took = [n == 0 and a >= 0 and row[-1] for n, a, row in zip(n_acc, alt, ok)]
    nxt = next_distribution([d + 1 if t else n for n, t in zip(n_acc, took)])
    if rule.rule == "exact":  # a rejected token leaves the distribution (the first rejected draft, then a rejected
        # alternative), unless nothing would be left
        for removed in ([row[n] if n < d and not t else -1 for row, n, t in zip(drafts.tolist(), n_acc, took)],
                        [a if n == 0 and a >= 0 and not t else -1 for n, a, t in zip(n_acc, alt, took)]):
            where = torch.tensor([x >= 0 for x in removed], device=drafts.device)
            if bool(where.any()):
                rest = nxt.scatter(-1, torch.tensor(removed, device=drafts.device).clamp(min=0)[:, None], 0.0)
                nxt = torch.where(where[:, None] & (rest.sum(-1, keepdim=True) > 0), rest, nxt)
    return [1 if t else n for n, t in zip(n_acc, took)], nxt, took


@functools.lru_cache(maxsize=None)
def _tested_rows(drafts: int, alternative: bool, device: torch.device) -> torch.Tensor:
    """(1, D[+1]): the row of a verify's logits each tested token is checked at: d_k at k - 1, the alternative at 0."""
    return torch.tensor([list(range(drafts)) + [0] * alternative], device=device)


@functools.lru_cache(maxsize=None)
@torch.inference_mode(False)  # (cached for calls in and out of inference mode: a plain tensor)
def tree_shape(drafts: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The verify's tree for [r, d1..dD, a]: (depth (D+2,), sees (D+2, D+2)) as `MeshTransformer.forward` takes it;
    the chain is causal, the alternative a sits at d1's depth and sees r and itself. Made once per D and device (the
    callers only read it)."""
    n = drafts + 2
    depth = torch.cat([torch.arange(drafts + 1), torch.ones(1, dtype=torch.long)]).to(device)
    sees = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    sees[-1, 1:-1] = False
    return depth, sees


def _first_token(model: MeshTransformer, heads: Drafter, cache: KVCache, sampling: SamplingConfig, grammar: Grammar,
                 state, generator):
    """The BOS prefill of `cache`'s sequences (all empty) and their first token, from the backbone alone: (token (B,),
    grammar state after it, the backbone's feature it was sampled from (B, 1, ·), as the drafter reads it)."""
    b = cache.lengths.shape[0]
    logits, hidden = model(torch.zeros(b, 1, dtype=torch.long, device=cache.lengths.device), cache=cache,
                           taps=heads.taps)
    r = draw(distribution(logits[:, -1], sampling, grammar.mask(state)), generator)
    return r, grammar.advance(state, r), hidden[:, -1:]


@torch.inference_mode()
def decode_speculative(
    model: MeshTransformer,
    heads: Drafter,
    cond: torch.Tensor,
    sampling: SamplingConfig,
    accept: AcceptConfig,
    num_heads: int,
    max_tokens: int,
    generator: torch.Generator | None = None,
    stats: DecodeStats | None = None,
    cache: KVCache | None = None,
    adaptive: bool | DraftLength = False,
    finished: torch.Tensor | None = None,
    join: Join | None = None,
    tree: bool = False,
    confidence: float = 0.0,
) -> Iterator[list[list[int]]]:
    """Speculative decoding of B sequences with D = num_heads drafts per step; yields per step, per sequence, the
    tokens accepted in that step (r, d1..da or the resampled/bonus token), like `decode_ar`. A caller-made `cache`
    (from `model.new_cache`) lets tests inspect it between steps. `adaptive` picks each step's draft length in
    0..num_heads from running acceptance and cost estimates (`xspecmesh.decoding.adaptive`): True starts them afresh,
    a `DraftLength` (for num_heads) goes on from its own. `generator`, `finished`
    and `join` as in `decode_ar`: a joining sequence gets its slot's backbone cache row and drafter state afresh, its
    BOS prefilled at once (a batch-1 forward on its cache row) and its first token drawn from the backbone alone with
    its own generator, as decoding it alone would; that token is yielded with the sequence's first step. `tree`: each
    step also verifies the drafter's runner-up for the first draft (`DraftWalk`), kept where d1 is rejected;
    `confidence` > 0 ends a step's drafts after one the drafter gives less probability than that (`DraftWalk`)."""
    stats = stats if stats is not None else DecodeStats()
    dev, b, d = cond.device, cond.shape[0], num_heads
    if not 1 <= d <= min(MAX_HEADS, heads.num_heads):
        raise ValueError(f"num_heads must be between 1 and {min(MAX_HEADS, heads.num_heads)}, got {d}")
    stats.accept_hist = [0] * (d + 1)
    stats.head_accepts, stats.head_trials = [0] * d, [0] * d
    stats.draft_hist = [0] * (d + 1)
    chooser = adaptive if isinstance(adaptive, DraftLength) else DraftLength(d) if adaptive else None
    if chooser and chooser.max_heads != d:
        raise ValueError(f"the draft-length chooser is for {chooser.max_heads} drafts, not {d}")
    if chooser:
        chooser.begin()
    start = time.perf_counter()
    if accept.rule == "greedy":
        sampling = SamplingConfig(temperature=0.0, top_k=sampling.top_k, top_p=sampling.top_p)
    grammar = Grammar.on(dev)
    max_tokens = token_limit(model, max_tokens)
    # A row verifies only while it holds fewer than max_tokens positions, and a finished row goes back to that
    # (step 5), so a verify's d + 1 new positions (d + 2 with the tree) never reach past max_tokens + d (+ 1).
    cache = cache if cache is not None else model.new_cache(cond, max_tokens + d + tree)
    head_ctx = heads.begin(model, cond, max_tokens + d)
    emitted = torch.zeros(b, dtype=torch.long, device=dev)
    outer = finished if finished is not None else torch.zeros(b, dtype=torch.bool, device=dev)
    leaving = Leaving(b, dev)

    # Prefill BOS; the first token comes from the backbone alone.
    r, state, feats = _first_token(model, heads, cache, sampling, grammar, grammar.start(b), generator)
    # The pairs (backbone feature, token sampled from it) committed since the drafter last ran: the last is [h, r].
    pending, counts = r[:, None], torch.ones_like(r)
    stats.steps += 1
    stats.seq_steps += b
    out = _commit(r[:, None], torch.ones(b, dtype=torch.long, device=dev), emitted, outer, max_tokens, stats)
    stats.seconds = time.perf_counter() - start
    yield out

    first: dict[int, list[int]] = {}  # slot -> the first token of a sequence that joined since the last step
    last_step, last_start = None, 0.0  # adaptive D: the last step's drafts, accepted and verified per row; its start
    while True:
        # (adaptive D: the last step ran from its start to here, its caller's work on its tokens included; the joins
        # below are per-sequence work that no choice of D changes, so they are not part of it)
        last_seconds = time.perf_counter() - last_start
        # 0. Continuous batching: finished slots taken over (before any row has left, so rows are slots here), or
        # finished rows leaving once nothing waits.
        if join is not None and not leaving.draining:
            t0 = time.perf_counter()
            joined = restart_slots(model, cache, join, outer, state, generator)
            leaving.draining = bool(outer.any())
            for slot, c in joined:
                heads.restart(model, head_ctx, slot, c)
                emitted[slot] = 0
                one, state[slot : slot + 1], h = _first_token(model, heads, cache.row(slot), sampling, grammar,
                                                              state[slot : slot + 1], [generator[slot]])
                r[slot], feats[slot, :1], pending[slot, :1], counts[slot] = one[0], h[0], one, 1
                stats.seq_steps += 1
                first[slot] = _commit(one[:, None], torch.ones_like(one), emitted[slot : slot + 1],
                                      outer[slot : slot + 1], max_tokens, stats)[0]
            stats.time_verify += time.perf_counter() - t0  # (backbone forwards)
            if first and bool(outer.all()):  # every sequence ended at its first token (a token limit of 1)
                yield [first.pop(slot, []) for slot in range(b)]
                continue
        if bool(outer.all()):
            return
        keep = leaving.shrink(leaving.rows(outer), cache, generator) if join is not None else None
        if keep is not None:
            r, state, emitted, feats, pending, counts = (x[keep] for x in (r, state, emitted, feats, pending, counts))
            head_ctx = heads.keep(head_ctx, keep)
        finished = leaving.rows(outer)
        rows = torch.arange(len(r), device=dev)

        # 1. Draft greedy tokens under the grammar along the chain (a draft decoder first catches up on the pairs
        # committed since its last call).
        t0 = time.perf_counter()
        if chooser and last_step:
            chooser.update(seconds=last_seconds, **last_step)
        dk = chooser.choose() if chooser else d
        branch = tree and dk > 0
        walk = DraftWalk(grammar, state, branch, confidence)
        # A step without drafts leaves the drafter alone: its pairs wait for the next step that drafts (a draft
        # decoder would otherwise pay a forward to catch up every step, the cost adaptive D = 0 exists to avoid).
        drafts = heads.propose(model, head_ctx, feats, pending, counts, dk, walk) if dk else r.new_zeros(len(r), 0)
        dk = drafts.shape[1]  # (fewer where the drafter's confidence ended the chain)
        verified = torch.cat([r[:, None], drafts], 1)
        states = torch.stack(walk.states, 1)  # (B, D+1): grammar state before each verified position's next token
        alt = walk.alternative
        branch = branch and bool((alt >= 0).any())  # (no sequence kept a runner-up: a plain chain)
        if branch:  # the tree: the runner-up for d1 verified after the chain, as a sibling of d1
            verified = torch.cat([verified, alt.clamp(min=0)[:, None]], 1)
            states = torch.cat([states, grammar.advance(state, verified[:, -1])[:, None]], 1)
        _sync(dev)
        t1 = time.perf_counter()

        # 2. Verify: one backbone forward over the D+1 new positions (D+2 with the tree).
        length = cache.lengths.clone()
        logits, hidden = model(verified, cache=cache, taps=heads.taps, tree=tree_shape(dk, dev) if branch else None)
        _sync(dev)
        t2 = time.perf_counter()

        # 3. Accept a prefix (or the alternative), 4. resample the first rejected position (or a bonus token after a
        # full accept).
        logits = logits.float().masked_fill(grammar.forbidden[states], float("-inf"))
        probs = distribution(logits, sampling)
        n_acc, nxt_probs, took = accept_drafts(accept, logits, probs, drafts, generator, alt if branch else None)
        r = draw(nxt_probs, generator)
        # (a finished row keeps nothing; the per-row results are host lists, and tensors only where indexing needs
        # them: at batch 1 each small op costs more than the Python that replaces it)
        done = finished.tolist()
        n_acc = [0 if f else n for n, f in zip(n_acc, done)]
        took = [t and not f for t, f in zip(took, done)]
        kept, last = torch.tensor([n_acc, [dk + 1 if t else n for n, t in zip(n_acc, took)]], device=dev)

        # 5. Commit: keep r_prev, d1..da (or the alternative) in the cache; the new r is fed next step.
        state = grammar.advance(states[rows, last], r)  # (the state before r: after d_a, or after the alternative)
        new = torch.cat([drafts, r[:, None]], 1)
        new[rows, kept] = r
        if any(took):  # the alternative goes where d1 was: token, cache slot, feature
            moved = torch.tensor([i for i, t in enumerate(took) if t], device=dev)
            new[moved, 0] = alt[moved]
            cache.move(moved, length[moved] + dk + 1, length[moved] + 1)
            hidden[moved, 1] = hidden[moved, dk + 1]
        hidden = hidden[:, : dk + 1]
        # Per live row: drafts accepted, and drafts verified as a continuation of what it kept: up to its first
        # rejected one; where it kept the alternative, d1 alone (rejected; d2.. were verified on the branch it dropped).
        accepted, verified = [], []
        for a, t, f in zip(n_acc, took, done):
            if f:
                continue
            accepted.append(a)
            verified.append(1 if t else min(a + 1, dk))
            stats.accept_hist[a] += 1
            for k in range(verified[-1]):
                stats.head_trials[k] += 1
                stats.head_accepts[k] += int(k < a and not t)
        stats.draft_hist[dk] += 1
        stats.alternatives += sum(took)
        stats.steps += 1
        stats.seq_steps += len(accepted)
        step_tokens = kept + 1
        out = _commit(new, step_tokens, emitted, finished, max_tokens, stats)
        leaving.write(outer, finished)
        # A finished row (this step included) keeps the cache it had before this verify and hands the drafter no
        # pairs: until it leaves the batch or its slot is taken over, later verifies still run over it, and neither
        # cache may grow past its size.
        if any(finished.tolist()):
            step_tokens = torch.where(finished, 0, step_tokens)
        cache.rollback(length + step_tokens)
        fresh = hidden, new, step_tokens
        # A step without drafts leaves the pairs unread: a drafter that reads all of them (a draft decoder's
        # catch-up) gets them before this step's (a finished row's are dropped); the paper's heads read the newest.
        if not dk and heads.reads_history:
            fresh = _append_pairs((feats, pending, torch.where(finished, 0, counts)), fresh)
        feats, pending, counts = fresh
        t3 = time.perf_counter()
        stats.time_draft += t1 - t0
        stats.time_verify += t2 - t1
        stats.time_other += t3 - t2
        stats.seconds = t3 - start
        last_step, last_start = dict(drafts=dk, accepted=accepted, verified=verified), t0
        out = leaving.by_slot(out, b)
        for slot, tokens in first.items():
            out[slot] = tokens + out[slot]
        first = {}
        yield out


def _append_pairs(old, new):
    """Per row, the drafter's unread pairs (features (B, n, dim), tokens (B, n), counts (B,)): old's counts[b] first,
    then new's. Written into old's buffers where they have room (grown by doubling where not), so a run of steps
    without drafts costs each step only its own pairs, not a copy of all the unread ones."""
    (f0, t0, c0), (f1, t1, c1) = old, new
    total = c0 + c1
    need = int(total.max())
    if need > f0.shape[1]:
        grow = max(need, 2 * f0.shape[1]) - f0.shape[1]
        f0 = torch.cat([f0, f0.new_zeros(f0.shape[0], grow, f0.shape[2])], 1)
        t0 = torch.cat([t0, t0.new_zeros(t0.shape[0], grow)], 1)
    rows, cols = (torch.arange(f1.shape[1], device=c1.device) < c1[:, None]).nonzero(as_tuple=True)
    at = c0[rows] + cols
    f0[rows, at] = f1[rows, cols]
    t0[rows, at] = t1[rows, cols]
    return f0, t0, total


def _commit(new, counts, emitted, finished, max_tokens, stats) -> list[list[int]]:
    """Per sequence, the first counts[b] tokens of new[b], cut at EOS and at max_tokens; updates emitted/finished."""
    out = []
    for i, (row, n) in enumerate(zip(new.tolist(), counts.tolist())):
        if finished[i]:
            out.append([])
            continue
        row = row[:n]
        if tok.EOS in row:
            row = row[: row.index(tok.EOS)]
            finished[i] = True
        row = row[: max(0, max_tokens - int(emitted[i]))]
        emitted[i] += len(row)
        if emitted[i] >= max_tokens:
            finished[i] = True
        out.append(row)
    stats.tokens += sum(len(r) for r in out)
    return out
