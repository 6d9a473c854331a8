"""XSpecMesh drafting heads (the paper's cross-attention decoding heads, and MLP heads for the ablation).

Head k (1..D) reads the backbone's final hidden state at position j, which the backbone's own output layer turns into
token j+1, and predicts token j+1+k. Each head has its own weights, stored stacked along a leading D axis, so all D
heads run as one batched computation (einsum over the head axis), never a Python loop. Residual branches start at
zero and the output projection is the backbone's, so an untrained head predicts what the backbone predicts next:
harmless, merely rarely accepted.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from xspecmesh.model.config import HeadsConfig, ModelConfig

if TYPE_CHECKING:
    from xspecmesh.decoding.token_sampling import DraftWalk


def _stacked(d: int, i: int, o: int, std: float = 0.02) -> nn.Parameter:
    return nn.Parameter(torch.randn(d, i, o) * std)


class DraftHeads(nn.Module):
    taps: tuple[int, ...] = ()  # backbone layers read besides the final state (none: the paper's heads)
    reads_history = False  # the committed pairs `propose` reads: the newest only
    factored = False  # outputs token logits over the vocabulary (a draft decoder may output axis values)

    def __init__(self, model_cfg: ModelConfig, cfg: HeadsConfig):
        super().__init__()
        self.cfg = cfg
        d, dim, hidden = cfg.num_heads, model_cfg.dim, model_cfg.dim * cfg.ff_mult
        attn = cfg.attn_dim or dim
        self.attn_heads = model_cfg.heads
        self.head_embed = nn.Parameter(torch.zeros(d, dim))  # which head: k
        if cfg.kind == "cross":
            self.attn_norm = nn.Parameter(torch.ones(d, dim))
            self.wq, self.wk, self.wv = _stacked(d, dim, attn), _stacked(d, dim, attn), _stacked(d, dim, attn)
            self.wo = nn.Parameter(torch.zeros(d, attn, dim))
        elif cfg.kind != "mlp":
            raise ValueError(f"unknown head kind {cfg.kind!r}")
        self.ff_norm = nn.Parameter(torch.ones(d, dim))
        self.w1, self.b1 = _stacked(d, dim, hidden), nn.Parameter(torch.zeros(d, hidden))
        self.w2, self.b2 = nn.Parameter(torch.zeros(d, hidden, dim)), nn.Parameter(torch.zeros(d, dim))
        if not cfg.shared_output:
            self.to_logits = nn.Linear(dim, model_cfg.vocab_size)

    @classmethod
    def for_backbone(cls, model: nn.Module, cfg: HeadsConfig) -> "DraftHeads":
        """Untrained heads for `model`; an own output projection starts as a copy of the backbone's, so that even
        then an untrained head predicts what the backbone predicts next."""
        heads = cls(model.cfg, cfg)
        if not cfg.shared_output:
            heads.to_logits.load_state_dict(model.to_logits.state_dict())
        return heads

    @property
    def num_heads(self) -> int:
        return self.cfg.num_heads

    def context(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-head keys/values over the condition tokens (B, D, H, M, hd): computed once per mesh."""
        if self.cfg.kind != "cross":
            return None
        b, m, dim = cond.shape
        k = torch.einsum("bmi,dio->bdmo", cond, self.wk).view(b, self.num_heads, m, self.attn_heads, -1)
        v = torch.einsum("bmi,dio->bdmo", cond, self.wv).view(b, self.num_heads, m, self.attn_heads, -1)
        return k.transpose(2, 3), v.transpose(2, 3)

    def features(self, hidden: torch.Tensor, context, heads: int | None = None) -> torch.Tensor:
        """hidden (B, T, dim) -> head states (B, T, D', dim) for the first D' = heads heads."""
        d = heads or self.num_heads
        x = hidden[:, :, None, :] + self.head_embed[:d]
        if self.cfg.kind == "cross":
            k, v = context
            b, t = hidden.shape[:2]
            q = torch.einsum("btdi,dio->btdo", F.layer_norm(x, x.shape[-1:]) * self.attn_norm[:d], self.wq[:d])
            q = q.view(b, t, d, self.attn_heads, -1).permute(0, 2, 3, 1, 4)  # (B, D, H, T, hd)
            att = F.scaled_dot_product_attention(q, k[:, :d], v[:, :d])  # (B, D, H, T, hd)
            att = att.permute(0, 3, 1, 2, 4).reshape(b, t, d, -1)
            x = x + torch.einsum("btdi,dio->btdo", att, self.wo[:d])
        h = F.layer_norm(x, x.shape[-1:]) * self.ff_norm[:d]
        h = F.gelu(torch.einsum("btdi,dio->btdo", h, self.w1[:d]) + self.b1[:d])
        return x + torch.einsum("btdi,dio->btdo", h, self.w2[:d]) + self.b2[:d]

    def forward(self, hidden: torch.Tensor, context, backbone_logits: nn.Linear, heads: int | None = None):
        """Draft logits (B, T, D', V): entry [:, j, k-1] predicts the token k positions after the backbone's next."""
        out = self.to_logits if not self.cfg.shared_output else backbone_logits
        return out(self.features(hidden, context, heads))

    # -- the drafter interface (shared with `drafter.DraftDecoder`) ---------------------------------------------
    def begin(self, model: nn.Module, cond: torch.Tensor, max_len: int):
        return self.context(cond)

    def restart(self, model: nn.Module, ctx, row: int, cond: torch.Tensor) -> None:
        """Row `row` taken over by a new sequence over `cond` (1, M, dim) (continuous batching)."""
        if ctx is not None:
            k, v = self.context(cond)
            ctx[0][row], ctx[1][row] = k[0], v[0]

    def keep(self, ctx, rows: torch.Tensor):
        """Only these rows (finished sequences leave the batch)."""
        return None if ctx is None else (ctx[0][rows], ctx[1][rows])

    def propose(self, model, ctx, feats, tokens, counts, drafts: int, walk: DraftWalk) -> torch.Tensor:
        """Up to `drafts` draft tokens (B, k) from the newest backbone state feats[b, counts[b] - 1] alone (the
        paper's heads never see the tokens); `walk` picks each in turn under the grammar, and may end the chain."""
        if not drafts:
            return tokens.new_zeros(feats.shape[0], 0)
        h = feats[torch.arange(feats.shape[0], device=feats.device), counts - 1]
        logits = self(h[:, None], ctx, model.to_logits, heads=drafts)[:, 0]  # all D heads in one batched call
        out = []
        for k in range(drafts):
            out.append(walk.best(logits[:, k]))
            if walk.done:
                break
        return torch.stack(out, 1)
