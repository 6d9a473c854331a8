"""Adaptive draft length (ours, beyond the paper): pick D for every speculative step from running estimates.

A step with D drafts yields 1 + a1 + a1*a2 + ... tokens on average (a_k: how often head k is accepted when the heads
before it were) and costs t(D) seconds. Weak heads make long drafts a loss — a rejected draft still pays for its
verification — so we choose the D in 0..D_max with the most expected tokens per second; D = 0 is a plain AR step.
Both estimates are exponential moving averages measured while decoding (so the hardware's real cost of verifying
D+1 positions is what counts). A step's time runs from its start to the next step's (less the joins of new sequences
in a batch, which no D changes), so the caller's work on the tokens each step yields (faces, messages) counts too:
that per-step cost is what fewer, longer steps save. Every
`probe_every` steps the full D_max is tried again so that acceptance estimates of far heads, and the cost of long
drafts, stay fresh. A probe costs several plain steps where drafting does not pay (a large batch, weak heads), so
while probes keep finding plain steps best the interval doubles, up to `max_probe_every`; a probe that finds drafts
worth it again brings it back to `probe_every`. An `Engine` keeps one chooser per D_max, batch size, acceptance
rule and sampling setting across its requests, so a short mesh starts from what the ones before it measured rather
than from the prior; but acceptance is the object's as much as the drafter's (one degenerate sample drives it near
zero, and probes backed off to every 64 steps would then leave the next objects on plain steps), so each decode
`begin`s with a probe and lets its own first steps outweigh what earlier ones left.
"""
from __future__ import annotations

import itertools
import math
import operator
import statistics


class DraftLength:
    """The estimates are a handful of numbers updated at every step, so they are plain Python floats: the chooser runs
    between a verify and the next drafts, where numpy's per-call overhead (a least-squares fit per step) cost more
    than the arithmetic, ~0.15 ms a step in a real decode."""

    def __init__(self, max_heads: int, decay: float = 0.9, probe_every: int = 16, max_probe_every: int = 64,
                 prior_accept: float = 0.5, prior_weight: float = 2.0, prior_cost_per_draft: float = 0.25,
                 min_cost_per_draft: float = 0.05):
        self.max_heads, self.decay = max_heads, decay
        self.probe_every, self.max_probe_every = probe_every, max_probe_every
        self.interval, self.last_probe, self.probing = probe_every, -probe_every, False  # steps between probes
        self.accept = [prior_accept] * max_heads  # P(head k accepted | heads < k accepted)
        self.observed = [0.0] * max_heads  # steps that verified head k's draft
        self.prior_weight = prior_weight  # the prior counts as this many steps: one unlucky first draft is not final
        self.seconds = [math.nan] * (max_heads + 1)  # EMA of a step's wall time, per D
        self.timed = [0] * (max_heads + 1)  # steps measured, per D
        self.prior_cost = prior_cost_per_draft  # relative cost of one more draft, until measured
        self.min_cost = min_cost_per_draft  # a draft is never free: keeps timing noise from favouring long drafts
        self.steps = 0

    def cost(self) -> list[float]:
        """Estimated seconds per step for every D: the least-squares line through the measurements, each D weighted
        by the steps behind its estimate (up to the EMA's span), so that a D tried once does not tilt the line as
        much as one measured every step (the prior slope through a single measurement; the prior alone before any)."""
        known = [(d, s, min(n, 1 / (1 - self.decay))) for d, (s, n) in enumerate(zip(self.seconds, self.timed))
                 if not math.isnan(s)]
        if not known:
            return [1.0 + self.prior_cost * d for d in range(self.max_heads + 1)]
        if len(known) >= 2:
            total = sum(w for _, _, w in known)
            mean_d = sum(w * d for d, _, w in known) / total
            mean_s = sum(w * s for _, s, w in known) / total
            spread = sum(w * (d - mean_d) ** 2 for d, _, w in known)
            slope = sum(w * (d - mean_d) * (s - mean_s) for d, s, w in known) / spread
            base = max(mean_s - slope * mean_d, 1e-9)
            slope = max(slope, self.min_cost * base)  # the fitted line everywhere: smoother than single measurements
        else:
            ((k, seconds, _),) = known
            base = seconds / (1.0 + self.prior_cost * k)
            slope = base * self.prior_cost
        return [base + slope * d for d in range(self.max_heads + 1)]

    def begin(self) -> None:
        """A new decode: probe at its first step, and let its acceptance evidence count as fresh (the estimates so far
        stay the starting point, weighted as the prior is)."""
        self.observed = [min(o, self.prior_weight) for o in self.observed]
        self.interval = self.probe_every
        self.last_probe = self.steps - self.interval

    def best(self) -> int:
        rates = [t / c for t, c in zip(self.expected_tokens(), self.cost())]
        return rates.index(max(rates))  # (the shortest of equals)

    def choose(self) -> int:
        self.steps += 1
        self.probing = self.steps - self.last_probe >= self.interval
        if self.probing:
            self.last_probe = self.steps
            return self.max_heads
        return self.best()

    def update(self, drafts: int, accepted: list[int], seconds: float, verified: list[int] | None = None) -> None:
        """After a step with `drafts` drafts: `accepted` drafts per live sequence, the step's wall time and, per
        sequence, how many drafts were verified as a continuation of what it kept (default: those up to its first
        rejected one; a sequence that kept the draft tree's alternative counts it as accepted, then ends there, since
        the drafts after d1 were verified on the branch it dropped)."""
        verified = verified if verified is not None else [min(a + 1, drafts) for a in accepted]
        for k in range(drafts):
            reached = [a for a, v in zip(accepted, verified) if v > k]  # sequences whose head k+1 draft counts
            if reached:
                rate = sum(a > k for a in reached) / len(reached)
                self.observed[k] += 1
                w = max(1 - self.decay, 1 / (self.observed[k] + self.prior_weight))  # a running mean, then an EMA
                self.accept[k] = (1 - w) * self.accept[k] + w * rate
        measured = not all(math.isnan(s) for s in self.seconds)  # else cost() is the prior's, in relative units
        if self.probing:  # did this probe yield tokens faster than a plain step would have? (unknown at first)
            paid = not measured or bool(accepted) and (1 + statistics.fmean(accepted)) / seconds > 1 / self.cost()[0]
            idle = self.best() == 0 and not paid
            self.interval = min(2 * self.interval, self.max_probe_every) if idle else self.probe_every
        # A step's time: a running mean, then an EMA, per D. A D measured for the first time starts from the line's
        # estimate for it, weighted as the prior is: a rarely chosen D otherwise kept its first time, an outlier as
        # often as not (one slow step), and through the fitted line it moved every D's cost.
        n, self.timed[drafts] = self.timed[drafts], self.timed[drafts] + 1
        if not measured:  # the first step measured: the line starts from it
            self.seconds[drafts] = seconds
        else:
            old = self.cost()[drafts] if math.isnan(self.seconds[drafts]) else self.seconds[drafts]
            w = max(1 - self.decay, 1 / (n + 1 + self.prior_weight))
            self.seconds[drafts] = (1 - w) * old + w * seconds

    def expected_tokens(self) -> list[float]:
        """E[tokens] of a step with D = 0..max drafts; a head never verified yet is assumed as good as the one
        before it (heads further out are rarely better)."""
        a = list(self.accept)
        for k in range(1, len(a)):
            if not self.observed[k]:
                a[k] = a[k - 1]
        return list(itertools.accumulate(itertools.accumulate(a, operator.mul), initial=1.0))
