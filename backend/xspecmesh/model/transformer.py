"""The BPT backbone: a perceiver point encoder and a decoder of cosine-attention blocks.

The model holds no generation state. `forward` runs either the whole sequence (training, the naive oracle) or only new
tokens against an explicit `KVCache` (decoding); both return logits and the final hidden states, which the drafting
heads read. Input position 0 of every sequence is BOS (a learned vector with no position); token i sits at input
position i + 1 and gets positional embedding i.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xspecmesh.geometry import tokenizer as tok
from xspecmesh.model.config import EncoderConfig, ModelConfig
from xspecmesh.model.kv_cache import KVCache

# ---------------------------------------------------------------------------------------------- point encoder


class FourierEmbedder(nn.Module):
    """x -> [x, sin(x f), cos(x f)] for frequencies f = 2^0..2^(n-1) (times pi), grouped per coordinate."""

    def __init__(self, num_freqs: int, include_pi: bool):
        super().__init__()
        freqs = 2.0 ** torch.arange(num_freqs, dtype=torch.float32)
        self.register_buffer("freqs", freqs * math.pi if include_pi else freqs, persistent=False)

    @staticmethod
    def out_dim(num_freqs: int) -> int:
        return 3 + 3 * 2 * num_freqs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = (x[..., None] * self.freqs).flatten(-2)
        return torch.cat([x, xf.sin(), xf.cos()], dim=-1)


class PerceiverAttention(nn.Module):
    """Plain softmax attention whose q/k/v projections are interleaved per head (as in the published weights)."""

    def __init__(self, width: int, heads: int, cross: bool):
        super().__init__()
        self.heads, self.cross = heads, cross
        if cross:
            self.to_q = nn.Linear(width, width, bias=False)
            self.to_kv = nn.Linear(width, 2 * width, bias=False)
        else:
            self.to_qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, n, w = x.shape
        h = self.heads
        if self.cross:
            q = self.to_q(x).view(b, n, h, -1)
            k, v = self.to_kv(context).view(b, context.shape[1], h, -1).chunk(2, dim=-1)
        else:
            q, k, v = self.to_qkv(x).view(b, n, h, -1).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(b, n, w))


class PerceiverMLP(nn.Module):
    def __init__(self, width: int, ratio: int):
        super().__init__()
        self.fc = nn.Linear(width, width * ratio)
        self.proj = nn.Linear(width * ratio, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class PerceiverBlock(nn.Module):
    """Pre-LN residual block: (cross- or self-) attention, then a GELU MLP."""

    def __init__(self, cfg: EncoderConfig, cross: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.ln_2 = nn.LayerNorm(cfg.width)  # the data's norm (cross) / the MLP's norm (self)
        self.attn = PerceiverAttention(cfg.width, cfg.heads, cross)
        self.mlp = PerceiverMLP(cfg.width, cfg.mlp_ratio)
        self.ln_3 = nn.LayerNorm(cfg.width) if cross else None

    def forward(self, x: torch.Tensor, data: torch.Tensor | None = None) -> torch.Tensor:
        if self.ln_3 is not None:
            x = x + self.attn(self.ln_1(x), self.ln_2(data))
            return x + self.mlp(self.ln_3(x))
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class PointEncoder(nn.Module):
    """Points with normals -> `num_latents` latent tokens (latent 0 is the global shape token)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.fourier = FourierEmbedder(cfg.num_freqs, cfg.fourier_pi)
        self.input_proj = nn.Linear(FourierEmbedder.out_dim(cfg.num_freqs) + 3, cfg.width)
        self.query = nn.Parameter(torch.randn(cfg.num_latents, cfg.width) * 0.02)
        self.cross = PerceiverBlock(cfg, cross=True)
        self.blocks = nn.ModuleList(PerceiverBlock(cfg, cross=False) for _ in range(cfg.depth))
        self.ln_post = nn.LayerNorm(cfg.width)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        data = self.input_proj(torch.cat([self.fourier(points[..., :3]), points[..., 3:6]], dim=-1))
        x = self.cross(self.query.expand(points.shape[0], -1, -1), data)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


# ---------------------------------------------------------------------------------------------- decoder


class CosineAttention(nn.Module):
    """Attention with per-head L2-normalised queries and keys and a fixed logit scale (BPT's qk-norm).

    Self-attention reads and writes the layer's slot of the KV cache; cross-attention carries learned memory
    key/values and its keys/values over the condition are computed once per mesh (`context_kv`).
    """

    def __init__(self, cfg: ModelConfig, cross: bool):
        super().__init__()
        self.heads, self.scale = cfg.heads, cfg.cosine_scale
        self.to_q = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.to_k = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.to_v = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.to_out = nn.Linear(cfg.dim, cfg.dim, bias=False)
        if cross and cfg.num_mem_kv:
            self.mem_k = nn.Parameter(torch.randn(cfg.heads, cfg.num_mem_kv, cfg.head_dim))
            self.mem_v = nn.Parameter(torch.randn(cfg.heads, cfg.num_mem_kv, cfg.head_dim))
        else:
            self.mem_k = self.mem_v = None

    def split(self, x: torch.Tensor) -> torch.Tensor:  # (b, n, h*d) -> (b, h, n, d)
        return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised keys and values over the condition tokens, memory key/values prepended."""
        k, v = self.split(self.to_k(context)), self.split(self.to_v(context))
        if self.mem_k is not None:
            b = context.shape[0]
            k = torch.cat([self.mem_k.expand(b, -1, -1, -1), k], dim=2)
            v = torch.cat([self.mem_v.expand(b, -1, -1, -1), v], dim=2)
        return F.normalize(k, dim=-1), v

    def attend(self, q, k, v, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        q = F.normalize(q, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale)
        return self.to_out(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """GLU with GELU: dim -> 2*inner (value half, then gate half) -> inner -> dim."""

    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * dim * mult)
        self.out = nn.Linear(dim * mult, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(value * F.gelu(gate))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_norm = nn.LayerNorm(cfg.dim)
        self.self_attn = CosineAttention(cfg, cross=False)
        self.cross_norm = nn.LayerNorm(cfg.dim)
        self.cross_attn = CosineAttention(cfg, cross=True)
        self.ff_norm = nn.LayerNorm(cfg.dim)
        self.ff = FeedForward(cfg.dim, cfg.ff_mult)

    def forward(self, x, cross_kv, self_kv, mask=None, causal: bool = False) -> torch.Tensor:
        """One block. `self_kv(k, v)` stores the new keys/values and returns those to attend over (the cache's
        slots, or the new ones themselves for a whole sequence); `cross_kv` is `cross_attn.context_kv(cond)`."""
        h = self.self_norm(x)
        attn = self.self_attn
        q, k, v = attn.split(attn.to_q(h)), attn.split(attn.to_k(h)), attn.split(attn.to_v(h))
        k, v = self_kv(F.normalize(k, dim=-1), v)
        x = x + attn.attend(q, k, v, mask, causal=causal)
        ca = self.cross_attn
        x = x + ca.attend(ca.split(ca.to_q(self.cross_norm(x))), *cross_kv, None)
        return x + self.ff(self.ff_norm(x))


class MeshTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = PointEncoder(cfg.encoder)
        self.cond_head_proj = nn.Linear(cfg.encoder.width, cfg.dim)  # latent 0 (global shape token)
        self.cond_proj = nn.Linear(cfg.encoder.width, cfg.dim)  # latents 1..
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.bos = nn.Parameter(torch.randn(cfg.dim) * 0.02)
        # One learned vector per token type: plain block, offset, special (patch-start) block; EOS gets none.
        self.type_embed = nn.Parameter(torch.randn(3, cfg.dim) * 0.02)
        self.layers = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(cfg.dim)
        self.to_logits = nn.Linear(cfg.dim, cfg.vocab_size)
        # plain block, offset, special block or EOS: selects the type vector (EOS gets none)
        self.register_buffer("token_type", torch.from_numpy(tok.token_classes(cfg.vocab_size)), persistent=False)
        self.apply(_init_weights)

    # -- condition ---------------------------------------------------------------------------------------------
    def encode(self, points: torch.Tensor) -> torch.Tensor:
        """(B, N, 6) points + normals -> (B, num_latents, dim) condition tokens for cross-attention."""
        latents = self.encoder(points)
        return torch.cat([self.cond_head_proj(latents[:, :1]), self.cond_proj(latents[:, 1:])], dim=1)

    def cross_kv(self, cond: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's cross-attention keys/values over the condition (computed once per mesh)."""
        return [layer.cross_attn.context_kv(cond) for layer in self.layers]

    def new_cache(self, cond: torch.Tensor, max_len: int | None = None) -> KVCache:
        """A cache for cond's batch (growing up to max_len), with every layer's cross-attention K/V computed once."""
        cfg = self.cfg
        max_len = min(max_len or cfg.max_seq_len + 1, cfg.max_seq_len + 1)
        cache = KVCache(cfg.depth, cond.shape[0], cfg.heads, max_len, cfg.head_dim, cond.device, cond.dtype)
        cache.cross = self.cross_kv(cond)
        return cache

    # -- decoder -----------------------------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor, seq_pos: torch.Tensor) -> torch.Tensor:
        """tokens (B, n), their input positions (B, n); position 0 is BOS whatever the token there."""
        is_bos = seq_pos == 0
        ids = tokens.clamp(min=0).masked_fill(is_bos, 0)
        pos = (seq_pos - 1).clamp(min=0)
        kind = self.token_type[ids]
        x = self.token_embed(ids) + self.pos_embed(pos)
        x = x + torch.cat([self.type_embed, self.type_embed.new_zeros(1, self.cfg.dim)])[kind]
        return torch.where(is_bos[..., None], self.bos.to(x.dtype).expand_as(x), x)

    def forward(
        self, tokens: torch.Tensor, cond: torch.Tensor | None = None, cache: KVCache | None = None,
        taps: tuple[int, ...] = (), tree: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and final hidden states (after the final norm) for every input position; with `taps`, the hidden
        states are followed by the outputs of those layers (1-based), concatenated: (B, n, dim * (1 + len(taps))),
        the features a drafter that reads the backbone's middle layers needs.

        Without a cache, `tokens` is whole sequences starting at input position 0 (BOS) and `cond` is required.
        With a cache, `tokens` are appended after each sequence's cached length, written into the cache, and the
        cache length advances by n (roll back what verification rejects). `tree` = (depth (n,), sees (n, n) bool), with
        a cache: the new tokens form a tree rather than a chain, token i at position depth[i] after the cached ones
        and attending to the new tokens sees[i] names (`KVCache.prepare`); they still fill the next n slots."""
        b, n = tokens.shape
        if cache is None:
            seq_pos = torch.arange(n, device=tokens.device).expand(b, n)
            cross = self.cross_kv(cond)
        else:
            seq_pos = cache.lengths[:, None] + torch.arange(n, device=tokens.device)
            cross = cache.cross
            at = cache.prepare(seq_pos, None if tree is None else tree[1])
            if tree is not None:
                seq_pos = cache.lengths[:, None] + tree[0]
        x = self.embed(tokens, seq_pos)
        tapped = []
        for i, layer in enumerate(self.layers):
            if cache is None:
                x = layer(x, cross[i], lambda k, v: (k, v), causal=True)
            else:
                x = layer(x, cross[i], lambda k, v: cache.write(i, at, k, v), at.mask)
            if i + 1 in taps:
                tapped.append(x)
        if cache is not None:
            cache.lengths += n
        hidden = self.final_norm(x)
        return self.to_logits(hidden), torch.cat([hidden, *tapped], -1) if tapped else hidden


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)
