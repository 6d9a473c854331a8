"""An explicit KV cache for B sequences of ragged lengths, with rollback.

Self-attention keys/values live in one buffer per layer, written in place at each sequence's own positions; the
buffer starts small and doubles as the sequences grow (up to `max_len`), so that a short mesh does not pay for zeroing
(and faulting in) the longest one's memory. The cross-attention keys/values over the condition are computed once per
mesh and kept in `cross`. Speculative verification writes D+1 positions, then `rollback` forgets the rejected ones:
stale entries past a sequence's length are never attended to, because the mask only admits keys at positions <= the
query's.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheWrite:
    """Where one forward's new tokens go, worked out once by `KVCache.prepare` and used by every layer's `write`."""

    seq_pos: torch.Tensor  # (B, n) input positions of the new tokens
    mask: torch.Tensor | None  # (B, 1, n, upto) additive: 0 at the keys each query may see, else -inf; None: all
    upto: int  # key slots the forward reads: [0, upto)
    start: int | None  # the common first position when every sequence has the same length (a slice write)


class KVCache:
    FIRST_SLOTS = 128  # slots allocated at first (a few hundred kB a layer at width 256); doubled when needed

    def __init__(self, layers: int, batch: int, heads: int, max_len: int, head_dim: int, device, dtype):
        self.max_len = max_len  # the most slots a sequence may use
        self.k = torch.zeros(layers, batch, heads, min(max_len, self.FIRST_SLOTS), head_dim, device=device,
                             dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # cached input positions per sequence
        self.cross: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (k, v) over the condition
        self.is_view = False  # a `row` of another cache, sharing its buffers (which must then not be replaced)

    def _grow(self, slots: int) -> None:
        """Room for at least `slots` slots: the buffers replaced by ones twice as long or more (at most max_len),
        what they held copied; unwritten slots are zero, as attention over them must stay finite."""
        if self.is_view:
            raise ValueError("a row view of a cache cannot grow; grow the cache it was taken from")
        size = min(self.max_len, max(slots, 2 * self.k.shape[3]))
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:3], size, old.shape[4])
            new[:, :, :, : old.shape[3]] = old
            setattr(self, name, new)

    def prepare(self, seq_pos: torch.Tensor, sees: torch.Tensor | None = None, last_only: bool = False) -> CacheWrite:
        """For new tokens at slots seq_pos (B, n), each sequence's next n: the attention mask over cached keys and
        how many key slots the forward needs. One host read per forward, not per layer. Each new token sees every
        key before the new ones and, among the new ones, those before it and itself, or with `sees` (n, n) bool
        those that sees[i] names (a draft tree: a branch does not see its siblings). `last_only`: only the last new
        token will attend (a one-layer drafter's catch-up), which in sequences of equal length sees every key: no
        mask then. The buffers grow here when the new tokens need more slots than they have."""
        starts = seq_pos[:, 0].tolist()
        n = seq_pos.shape[1]
        upto = max(starts) + n
        if upto > self.max_len:
            raise ValueError(f"sequence longer than the cache ({upto} > {self.max_len})")
        if upto > self.k.shape[3]:
            self._grow(upto)
        start = starts[0] if min(starts) == max(starts) else None
        if start is not None and (n == 1 or last_only):
            return CacheWrite(seq_pos, None, upto, start)  # every cached key is visible
        # Each row's mask is a window onto one pattern per (n, sees) (`mask_pattern`): for equal lengths the same
        # window, a view; for ragged ones a gather of each row's window.
        pattern = mask_pattern(n, sees, self.max_len, self.k.dtype, self.k.device)
        if start is not None:
            mask = pattern[None, None, :, self.max_len - upto : self.max_len].expand(len(starts), -1, -1, -1)
        else:
            cols = torch.arange(upto, device=seq_pos.device) + (self.max_len - n - seq_pos[:, :1])  # (B, keys)
            mask = pattern[:, cols].transpose(0, 1)[:, None]
        return CacheWrite(seq_pos, mask, upto, start)

    def write(self, layer: int, at: CacheWrite, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, H, n, d) where `at` (from `prepare`) says; return the layer's keys/values for slots
        [0, at.upto)."""
        if at.start is not None:
            self.k[layer, :, :, at.start : at.start + k.shape[2]] = k
            self.v[layer, :, :, at.start : at.start + k.shape[2]] = v
        else:
            b = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k[layer].transpose(1, 2)[b, at.seq_pos] = k.transpose(1, 2)
            self.v[layer].transpose(1, 2)[b, at.seq_pos] = v.transpose(1, 2)
        return self.k[layer, :, :, : at.upto], self.v[layer, :, :, : at.upto]

    def restart(self, row: int, cross: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Give one sequence's slot to a new sequence (continuous batching): length 0, and its cross-attention
        keys/values (per layer, batch 1) in place of the old ones."""
        self.lengths[row] = 0
        for (k, v), (new_k, new_v) in zip(self.cross, cross):
            k[row], v[row] = new_k[0], new_v[0]

    def row(self, row: int) -> "KVCache":
        """Sequence `row` alone, as a batch-1 cache whose buffers are views into this one's: a forward on it (a
        joining sequence's BOS prefill) writes this cache's row and advances its length."""
        view = copy.copy(self)
        view.k, view.v, view.lengths = self.k[:, row : row + 1], self.v[:, row : row + 1], self.lengths[row : row + 1]
        view.is_view = True
        view.cross = [(k[row : row + 1], v[row : row + 1]) for k, v in self.cross]
        return view

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these sequences (indices), in this order: finished ones leave the batch."""
        self.k, self.v, self.lengths = self.k[:, rows], self.v[:, rows], self.lengths[rows]
        self.cross = [(k[rows], v[rows]) for k, v in self.cross]

    def move(self, rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """In sequences `rows`, every layer's keys/values at slot src[i] copied to slot dst[i] (an accepted tree
        branch moved to where the sequence goes on)."""
        for buf in (self.k, self.v):
            buf[:, rows, :, dst] = buf[:, rows, :, src]

    def rollback(self, lengths: torch.Tensor) -> None:
        """Forget every position at or past `lengths` (per sequence); later writes overwrite them."""
        if bool((lengths > self.lengths).any()):
            raise ValueError("rollback can only shorten sequences")
        self.lengths = lengths.clone()


@functools.lru_cache(maxsize=64)
@torch.inference_mode(False)  # (cached for calls in and out of inference mode: a plain tensor)
def mask_pattern(n: int, sees: torch.Tensor | None, max_len: int, dtype, device) -> torch.Tensor:
    """(n, 2 max_len) additive mask (0 visible, -inf not) for n new tokens whose last is at column max_len - 1: the
    columns before them visible, theirs as `sees` says (None: causal), those after them not. A row whose new tokens
    start at slot `start` reads columns from max_len - n - start on, so its key j lands on its own place. Made once
    per (n, sees, max_len, dtype, device) and shared by every cache (callers only read it): `sees` is a tree shape
    made once per draft length (`tree_shape`), keyed by identity, and kept alive here. In the cache's dtype, as
    attention would otherwise turn a boolean mask into this in every layer; building a mask per forward took a dozen
    small ops (~0.1 ms on a CPU after a verify)."""
    new = torch.ones(n, n, dtype=torch.bool, device=device).tril() if sees is None else sees
    visible = torch.cat([new.new_ones(n, max_len - n), new, new.new_zeros(n, max_len)], 1)
    return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, -torch.inf)
