"""Sampling in BPT's order (top-k, then top-p on the raw logits, then temperature) and the token grammar.

Every random draw takes exactly one uniform number from the caller's generator and inverts the CDF, so two decoders
that see the same distributions consume the same random stream and pick the same tokens (the naive loop, the fast
loop and speculative decoding with δ = 1 all agree token for token).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from xspecmesh.geometry import tokenizer as tok


@dataclass
class SamplingConfig:
    temperature: float = 0.5  # 0 = greedy
    top_k: int = 50  # 0 = off
    top_p: float = 0.95  # 1 = off


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the top-k logits, then the smallest set whose probability reaches top_p; the rest become -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p  # mass before this token already reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def distribution(logits: torch.Tensor, cfg: SamplingConfig, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The probabilities plain sampling draws from (grammar mask applied first). Greedy gives a one-hot.

    With top-k on, only the k best logits are sorted and filtered (not the whole vocabulary): same result as
    `filter_logits`, a fraction of the work in the decode loop."""
    logits = logits.float()
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    if cfg.temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    if not cfg.top_k or cfg.top_k >= logits.shape[-1]:
        return (filter_logits(logits, 0, cfg.top_p) / cfg.temperature).softmax(-1)
    vals, idx = torch.topk(logits, cfg.top_k, dim=-1)  # sorted, best first
    vals = filter_logits(vals, 0, cfg.top_p)
    return torch.zeros_like(logits).scatter(-1, idx, (vals / cfg.temperature).softmax(-1))


def uniform(shape, generator, device, dtype) -> torch.Tensor:
    """Uniform numbers of `shape` (B, ...) from one generator, or row b from generator[b] when given a list: with one
    generator per sequence (its own seed), a sequence decoded in a batch draws the numbers it draws decoded alone."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.rand(tuple(shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])
    return torch.rand(shape, generator=generator, device=device, dtype=dtype)


def draw(probs: torch.Tensor, generator) -> torch.Tensor:
    """One token per row by inverting the CDF with one uniform number per row (generator: one, or one per row)."""
    u = uniform(probs.shape[:-1] + (1,), generator, probs.device, probs.dtype)
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, u * cdf[..., -1:], right=True).squeeze(-1)
    return idx.clamp(max=probs.shape[-1] - 1)


# ---------------------------------------------------------------------------------------------- grammar
# A tiny state machine over token classes keeps every sampled sequence decodable: an offset must follow a block
# token; the first token is a plain block; a patch needs three vertices before another patch or EOS may start; after
# a patch centre the next vertex re-emits its plain block (as BPT's serializer always does).
PLAIN, OFFSET, SPECIAL, END = tok.PLAIN, tok.OFFSET, tok.SPECIAL, tok.END
(START, NEED_FIRST, NEED_CENTRE, NEED_1, NEED_2, NEED_3, HAVE_1_FIRST, HAVE_1, HAVE_2, HAVE_3, DONE) = range(11)
NUM_STATES = 11
_X = -1  # forbidden
# NEXT[state][class]
_NEXT = {
    START: {PLAIN: NEED_FIRST},
    NEED_FIRST: {OFFSET: HAVE_1_FIRST},
    NEED_CENTRE: {OFFSET: HAVE_1},
    NEED_1: {OFFSET: HAVE_2},
    NEED_2: {OFFSET: HAVE_3},
    NEED_3: {OFFSET: HAVE_3},
    HAVE_1_FIRST: {OFFSET: HAVE_2, PLAIN: NEED_1},
    HAVE_1: {PLAIN: NEED_1},
    HAVE_2: {OFFSET: HAVE_3, PLAIN: NEED_2},
    HAVE_3: {OFFSET: HAVE_3, PLAIN: NEED_3, SPECIAL: NEED_CENTRE, END: DONE},
    DONE: {END: DONE},
}


class Grammar:
    """Vectorised grammar: `mask(state)` -> allowed tokens (B, V); `advance(state, tokens)` -> next state."""

    def __init__(self, device="cpu", vocab_size: int = tok.VOCAB_SIZE):
        nxt = torch.full((NUM_STATES, 4), _X, dtype=torch.long)
        for s, row in _NEXT.items():
            for c, t in row.items():
                nxt[s, c] = t
        cls = torch.from_numpy(tok.token_classes(vocab_size))
        self.cls = cls.to(device)
        self.allowed = (nxt >= 0)[:, cls].to(device)  # (states, V)
        self.forbidden = ~self.allowed  # (a verify masks with it: one op fewer than inverting per step)
        self.next = torch.where(nxt >= 0, nxt, DONE).to(device)  # (a forbidden class leads to DONE)
        self.classes = [[c for c in range(4) if nxt[s, c] >= 0] for s in range(NUM_STATES)]  # allowed, per state

    @classmethod
    @functools.lru_cache(maxsize=None)
    @torch.inference_mode(False)  # (cached for calls in and out of inference mode: plain tensors)
    def on(cls, device, vocab_size: int = tok.VOCAB_SIZE) -> "Grammar":
        """The tables on `device`, built once and shared by every decode (nothing writes to them): building them
        takes ~0.6 ms, a fixed cost of every mesh."""
        return cls(device, vocab_size)

    def start(self, batch: int) -> torch.Tensor:
        return torch.full((batch,), START, dtype=torch.long, device=self.next.device)

    def mask(self, state: torch.Tensor) -> torch.Tensor:
        return self.allowed[state]

    def advance(self, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Next state; a forbidden token sends the sequence to DONE (it never happens for masked draws)."""
        return self.next[state, self.cls[tokens]]

    def run(self, tokens: list[int]) -> int:
        """State after a whole sequence (host-side, for tests and resuming)."""
        state = self.start(1)
        for t in tokens:
            state = self.advance(state, torch.tensor([t], device=state.device))
        return int(state)


class DraftWalk:
    """The grammar along one step's chain of drafts: each draft is the drafter's best token among those the grammar
    allows after the drafts before it. `states` grows to the state before each verified position's token.

    With `branch`, the first pick also keeps the runner-up (`alternative`) where the drafter doubts its first choice
    (gives it less than RUNNER_UP_BELOW; -1 elsewhere, and where the grammar allows one token only): a second
    candidate for the first draft, a draft tree of two branches at depth one. With `confidence` > 0
    the chain ends (`done`) after a draft to which the drafter gives less probability than that in every sequence:
    the drafts after it would rarely be accepted, and drafting and verifying them costs (EAGLE-2's dynamic drafts,
    on a chain)."""

    # Above this the first choice is rarely wrong where its runner-up is right (the shipped drafter, threshold rule,
    # 2222 steps: the runner-up was kept in 9 of the 1035 with d1 above 0.7, 8 of the 78 at 0.6-0.7), and verifying it
    # costs a position.
    RUNNER_UP_BELOW = 0.7

    def __init__(self, grammar: Grammar, state: torch.Tensor, branch: bool = False, confidence: float = 0.0):
        self.grammar, self.states = grammar, [state]
        self.branch, self.alternative = branch, None
        self.confidence, self.done = confidence, False

    @property
    def wants_runner_up(self) -> bool:
        return self.branch and len(self.states) == 1  # (only the first draft has a runner-up kept)

    def best(self, logits: torch.Tensor) -> torch.Tensor:
        """The next drafts from full logits (B, V): the allowed token with the highest logit, taken."""
        logits = logits.float().masked_fill(~self.grammar.mask(self.states[-1]), float("-inf"))
        confidence = logits.softmax(-1).amax(-1).tolist() if self.confidence > 0 or self.wants_runner_up else None
        if not self.wants_runner_up:
            return self.pick(logits.argmax(-1), confidence)
        top = logits.topk(2, -1)
        return self.pick(top.indices[:, 0], confidence, torch.where(top.values[:, 1] > float("-inf"),
                                                                    top.indices[:, 1], -1))

    def pick(self, tokens: torch.Tensor, confidence: list[float] | None = None,
             runner_up: torch.Tensor | None = None) -> torch.Tensor:
        """Take the drafts `tokens` (B,) that a drafter found best among the allowed ones (`best`, or a drafter's
        own search), given the probability it gives each (needed with a confidence stop or a runner-up) and, where
        `wants_runner_up`, its second best (-1: none)."""
        if self.confidence > 0:
            self.done = all(p < self.confidence for p in confidence)
        if self.wants_runner_up:
            doubted = torch.tensor([p < self.RUNNER_UP_BELOW for p in confidence], device=runner_up.device)
            self.alternative = torch.where(doubted, runner_up, -1)
        return self.take(tokens)

    def take(self, tokens: torch.Tensor) -> torch.Tensor:
        self.states.append(self.grammar.advance(self.states[-1], tokens))
        return tokens
