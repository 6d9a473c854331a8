"""Auto-regressive decoding: the fast loop (a KV cache written in place and grown by doubling, condition K/V computed
once, one new token per step) and a deliberately naive loop in the style of the published code (cache grown by
concatenation, prefix re-embedded, cross-attention recomputed every step), kept as a benchmark baseline and as a
correctness oracle.

Both are generators: each step yields, per sequence, the list of tokens accepted in that step (empty once a sequence
has finished), so callers stream, detokenize and cancel between steps.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from xspecmesh.geometry import tokenizer as tok
from xspecmesh.model.transformer import MeshTransformer
from xspecmesh.decoding.settings_schema import MAX_HEADS  # verification needs that many positions past the tokens
from xspecmesh.decoding.token_sampling import START, Grammar, SamplingConfig, distribution, draw


def token_limit(model: MeshTransformer, max_tokens: int) -> int:
    """One cap for every decoder, so AR and speculative decoding stop at the same length."""
    return min(max_tokens, model.cfg.max_seq_len - MAX_HEADS - 1)


@dataclass
class DecodeStats:
    """Returned (never logged) by every decoder; speculative decoding fills the extra fields."""

    steps: int = 0  # batched backbone forwards (the prefill included; not a joining sequence's own prefill)
    tokens: int = 0  # accepted tokens over all sequences (EOS excluded)
    seq_steps: int = 0  # steps summed over the sequences still running in them (= steps for one sequence)
    seconds: float = 0.0
    accept_hist: list[int] = field(default_factory=list)  # accept_hist[a] = steps that accepted a drafts
    head_accepts: list[int] = field(default_factory=list)  # per head: drafts accepted
    head_trials: list[int] = field(default_factory=list)  # per head: drafts reaching verification
    draft_hist: list[int] = field(default_factory=list)  # draft_hist[d] = steps drafting d tokens
    alternatives: int = 0  # steps that kept the draft tree's alternative first draft (counted in accept_hist[1])
    time_draft: float = 0.0
    time_verify: float = 0.0
    time_other: float = 0.0

    @property
    def scr(self) -> float:
        """Step compression ratio: tokens per decoding step of a sequence (at most 1 for AR)."""
        return self.tokens / self.seq_steps if self.seq_steps else 0.0

    def as_dict(self) -> dict:
        d = {"steps": self.steps, "tokens": self.tokens, "seconds": round(self.seconds, 4), "scr": round(self.scr, 4),
             "tokens_per_second": round(self.tokens / self.seconds, 2) if self.seconds > 0 else 0.0}
        if self.head_trials:
            d["accept_hist"] = list(self.accept_hist)
            d["head_accept_rates"] = [round(a / t, 4) if t else None  # (None: no draft of that head was verified)
                                      for a, t in zip(self.head_accepts, self.head_trials)]
            d["head_accepts"], d["head_trials"] = list(self.head_accepts), list(self.head_trials)
            d["draft_hist"] = list(self.draft_hist)
            d["alternatives"] = self.alternatives
            d["time_split"] = {"draft": round(self.time_draft, 4), "verify": round(self.time_verify, 4),
                               "other": round(self.time_other, 4)}
        return d


# Continuous batching: after each step a decoder calls join(free slots) -> [(slot, cond (1, M, dim), generator)] for
# the sequences that take those slots over; a new sequence starts at BOS (AR: in the next step; speculative decoding
# prefills it at once).
Join = Callable[[list[int]], list[tuple[int, torch.Tensor, torch.Generator]]]


def restart_slots(model: MeshTransformer, cache, join: Join | None, finished: torch.Tensor, state: torch.Tensor,
                  generator) -> list[tuple[int, torch.Tensor]]:
    """Hand finished slots to joining sequences: their cache slot emptied with the new condition's cross-attention
    keys/values, grammar state START, not finished, their own generator. Returns (slot, cond) of each."""
    if join is None or not bool(finished.any()):
        return []
    joined = join(torch.nonzero(finished).flatten().tolist())
    for slot, cond, gen in joined:
        cache.restart(slot, model.cross_kv(cond))
        state[slot] = START
        finished[slot] = False
        generator[slot] = gen
    return [(slot, cond) for slot, cond, _ in joined]


class Leaving:
    """Finished sequences leave the batch once nothing waits for their slots (continuous batching's drain): the
    decoder's rows shrink to the live ones, while the caller keeps seeing every slot. `rows(finished)` is the
    decoder's view of the caller's (slots,) mask; `by_slot` spreads a step's per-row output back over the slots."""

    def __init__(self, slots: int, device):
        self.slot_of = torch.arange(slots, device=device)  # the slot of each row
        self.draining = False  # set once a join left a slot empty: nothing waits any more

    def rows(self, finished: torch.Tensor) -> torch.Tensor:
        return finished if len(self.slot_of) == len(finished) else finished[self.slot_of]

    def write(self, finished: torch.Tensor, rows: torch.Tensor) -> None:
        """The rows' finished flags back into the caller's mask."""
        if rows is not finished:
            finished[self.slot_of] = rows

    def by_slot(self, out: list, slots: int) -> list:
        if len(out) == slots:
            return out
        full: list = [[] for _ in range(slots)]
        for slot, o in zip(self.slot_of.tolist(), out):
            full[slot] = o
        return full

    def shrink(self, finished_rows: torch.Tensor, cache, generator) -> torch.Tensor | None:
        """When a quarter of the rows or more have finished (and nothing waits): keep the live rows of the cache and
        of the per-row generators (a list, changed in place) and return their indices, by which the decoder keeps
        its own per-row tensors; else None."""
        done = int(finished_rows.sum())
        if not self.draining or not done or done * 4 < len(finished_rows) or bool(finished_rows.all()):
            return None
        keep = torch.nonzero(~finished_rows).flatten()
        self.slot_of = self.slot_of[keep]
        cache.keep(keep)
        if isinstance(generator, list):
            generator[:] = [generator[i] for i in keep.tolist()]
        return keep


def _emit(tokens: torch.Tensor, finished: torch.Tensor) -> list[list[int]]:
    """Per sequence the accepted token (none once finished; EOS is not reported as a token)."""
    return [[] if f or t == tok.EOS else [t] for t, f in zip(tokens.tolist(), finished.tolist())]


def _sample_step(logits, sampling, grammar, state, finished, generator):
    """One AR token per sequence under the grammar; finished sequences get EOS (and `finished` is updated)."""
    nxt = draw(distribution(logits, sampling, grammar.mask(state)), generator)
    nxt = torch.where(finished, torch.full_like(nxt, tok.EOS), nxt)
    accepted = _emit(nxt, finished)
    finished |= nxt == tok.EOS
    return nxt, grammar.advance(state, nxt), accepted


@torch.inference_mode()
def decode_ar(
    model: MeshTransformer,
    cond: torch.Tensor,
    sampling: SamplingConfig,
    max_tokens: int,
    generator: torch.Generator | None = None,
    stats: DecodeStats | None = None,
    finished: torch.Tensor | None = None,
    join: Join | None = None,
) -> Iterator[list[list[int]]]:
    """Plain AR decoding of B sequences (ragged stops): prefill BOS, then one cached forward per token.

    `generator`: one, or a list with one per sequence (each sequence its own seed; see token_sampling.uniform).
    `finished`: an optional caller-owned (B,) bool tensor, updated in place as sequences end; between steps the
    caller may set a sequence's entry to stop it (its own face or token limit, a cancel) — it then emits nothing.
    `join` (with one generator per sequence): finished slots are taken over by new sequences (see `Join`); the caller
    then stops each sequence at its token limit, which must not exceed `max_tokens`."""
    stats = stats if stats is not None else DecodeStats()
    start = time.perf_counter()
    b = cond.shape[0]
    grammar = Grammar.on(cond.device)
    state = grammar.start(b)
    outer = finished if finished is not None else torch.zeros(b, dtype=torch.bool, device=cond.device)
    leaving = Leaving(b, cond.device)
    max_tokens = token_limit(model, max_tokens)
    cache = model.new_cache(cond, max_tokens + 1)
    inp = torch.zeros(b, 1, dtype=torch.long, device=cond.device)  # input position 0 is BOS
    for _ in itertools.count() if join else range(max_tokens):
        finished = leaving.rows(outer)
        logits, _ = model(inp, cache=cache)
        if join is not None:  # a finished slot waiting for no one must not outgrow the cache: it keeps its length
            cache.rollback(torch.where(finished, cache.lengths - 1, cache.lengths))
        stats.seq_steps += int((~finished).sum())
        nxt, state, accepted = _sample_step(logits[:, -1], sampling, grammar, state, finished, generator)
        leaving.write(outer, finished)
        stats.steps += 1
        stats.tokens += sum(len(a) for a in accepted)
        stats.seconds = time.perf_counter() - start
        yield leaving.by_slot(accepted, b)
        inp = nxt[:, None]
        if join is not None and not leaving.draining:
            for slot, _ in restart_slots(model, cache, join, outer, state, generator):
                inp[slot] = 0  # BOS
            leaving.draining = bool(outer.any())
        if bool(outer.all()):
            return
        keep = leaving.shrink(leaving.rows(outer), cache, generator) if join is not None else None
        if keep is not None:
            inp, state = inp[keep], state[keep]


@torch.inference_mode()
def decode_naive(
    model: MeshTransformer,
    cond: torch.Tensor,
    sampling: SamplingConfig,
    max_tokens: int,
    generator: torch.Generator | None = None,
    stats: DecodeStats | None = None,
    finished: torch.Tensor | None = None,
) -> Iterator[list[list[int]]]:
    """The published-code-style loop (BPT's `generate` on x-transformers 1.26.6, the version it pins): every step
    re-embeds the whole prefix, recomputes every layer's cross-attention keys/values over the condition, appends the
    new self-attention keys/values with torch.cat, and, because the cache holds keys from before the qk-norm,
    L2-normalises every cached key again."""
    stats = stats if stats is not None else DecodeStats()
    start = time.perf_counter()
    b = cond.shape[0]
    grammar = Grammar.on(cond.device)
    state = grammar.start(b)
    finished = finished if finished is not None else torch.zeros(b, dtype=torch.bool, device=cond.device)
    seq = torch.zeros(b, 1, dtype=torch.long, device=cond.device)  # position 0: BOS
    past: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(model.layers)
    for _ in range(token_limit(model, max_tokens)):
        n = seq.shape[1]
        x = model.embed(seq, torch.arange(n, device=seq.device).expand(b, n))[:, -1:]  # prefix re-embedded
        for i, layer in enumerate(model.layers):
            attn = layer.self_attn
            h = layer.self_norm(x)
            k, v = attn.split(attn.to_k(h)), attn.split(attn.to_v(h))
            if past[i] is not None:
                k, v = torch.cat([past[i][0], k], dim=2), torch.cat([past[i][1], v], dim=2)
            past[i] = (k, v)
            x = x + attn.attend(attn.split(attn.to_q(h)), F.normalize(k, dim=-1), v)
            ca = layer.cross_attn
            x = x + ca.attend(ca.split(ca.to_q(layer.cross_norm(x))), *ca.context_kv(cond))
            x = x + layer.ff(layer.ff_norm(x))
        logits = model.to_logits(model.final_norm(x))
        stats.seq_steps += int((~finished).sum())
        nxt, state, accepted = _sample_step(logits[:, -1], sampling, grammar, state, finished, generator)
        stats.steps += 1
        stats.tokens += sum(len(a) for a in accepted)
        stats.seconds = time.perf_counter() - start
        yield accepted
        if bool(finished.all()):
            return
        seq = torch.cat([seq, nxt[:, None]], dim=1)


def run_to_end(steps: Iterator[list[list[int]]], batch: int) -> list[list[int]]:
    """Drain a decoder; the tokens of each sequence (without EOS)."""
    out: list[list[int]] = [[] for _ in range(batch)]
    for accepted in steps:
        for seq, new in zip(out, accepted):
            seq.extend(new)
    return out
