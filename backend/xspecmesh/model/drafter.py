"""Token-aware drafters (ours, beyond the paper): draft k sees the backbone's state and the tokens fixed before it.

The paper's heads (`heads.DraftHeads`) read only the backbone's last hidden state h_j, so head k must guess token
j+1+k without knowing the tokens sampled in between — hopeless on BPT's alternating block/offset tokens, where an
offset means little without the block just before it. A `DraftDecoder` is one decoder block (the backbone's own
kind: cosine self-attention, cross-attention to the point-cloud condition, GLU feed-forward) that runs
auto-regressively over pairs [feature, embedding of the token sampled from it], EAGLE-style:

    draft 1  input [h_j, e(r)]          -> feature g_1 -> backbone output layer -> d1 (grammar-masked argmax)
    draft k  input [g_(k-1), e(d_(k-1))] -> g_k -> d_k

Two kinds share the block and differ only in what its self-attention sees:
    eagle     its own KV cache over every committed position (pairs of the backbone's true features and tokens); after
              a verify the accepted positions are re-fed with the backbone's features (the drafts' own features
              were approximations)
    grounded  only the current step's chain [h_j, r], [g_1, d1], ... (Hydra-like: no cache across steps)

Optionally (EAGLE-3's feature fusion) the committed pairs also carry the outputs of some of the backbone's middle
layers (`taps`, each through its own LayerNorm), which still hold what the sequence so far is (the current vertex and
patch) where the last layer holds its guess at the next token, and the backbone's position embedding of the token
(`positions`), so that attention can find "the vertex before" by place. A draft's own feature has no taps: the tap
projection is skipped for it, not fed zeros.

The token embedding is the backbone's (shared, not stored). The output is either the backbone's projection onto the
5121-token vocabulary (a dim x 5121 matrix read for every draft) or, far cheaper, factored by axis: a BPT token
names three axis values (8 per axis for a block, 16 for an offset), so the drafter emits 3 x 8 + 3 x 16 axis logits
and 4 class logits and a token's logit is the sum of its class's and its three axes' (`factored_logits`; training
works its loss out from the 76 values, `factored_log_normalizer`). A draft is the argmax, so only the ranking
matters, and where the backbone is confident its top token holds the top value on every axis. Drafts are greedy,
hence a deterministic function of the context, which is what the `exact` acceptance rule needs to stay lossless.
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from xspecmesh.geometry import tokenizer as tok
from xspecmesh.model.config import HeadsConfig, ModelConfig
from xspecmesh.model.heads import DraftHeads
from xspecmesh.model.kv_cache import KVCache
from xspecmesh.model.transformer import DecoderBlock

if TYPE_CHECKING:
    from xspecmesh.decoding.token_sampling import DraftWalk

DECODER_KINDS = ("eagle", "grounded")
KINDS = ("cross", "mlp", *DECODER_KINDS)
OUTPUTS = ("shared", "factored")
_B, _O = tok.BLOCK_SIZE, tok.OFFSET_SIZE
FACTORED_WIDTH = 3 * _B + 3 * _O + 4  # block axes, offset axes, classes (plain, offset, special, EOS)


def factored_logits(x: torch.Tensor) -> torch.Tensor:
    """(..., FACTORED_WIDTH) axis and class logits -> (..., 5121) token logits in the tokenizer's order."""
    bx, by, bz, ox, oy, oz = x[..., : 3 * _B + 3 * _O].split([_B] * 3 + [_O] * 3, -1)
    cls = x[..., 3 * _B + 3 * _O :]
    blocks = (bx[..., :, None, None] + by[..., None, :, None] + bz[..., None, None, :]).flatten(-3)
    offsets = (ox[..., :, None, None] + oy[..., None, :, None] + oz[..., None, None, :]).flatten(-3)
    return torch.cat([blocks + cls[..., :1], offsets + cls[..., 1:2], blocks + cls[..., 2:3], cls[..., 3:]], -1)


# A factored output's token logits are linear in its values, factored_logits(x) = x @ basis.T with a 0/1 basis (V,
# FACTORED_WIDTH) naming each token's class and axis values; training's loss needs only these closed forms of it.
def factor_basis(device=None, dtype=torch.float32) -> torch.Tensor:
    """(V, FACTORED_WIDTH): row v has a 1 at token v's class and at its three axis values (EOS: its class only)."""
    return factored_logits(torch.eye(FACTORED_WIDTH, device=device, dtype=dtype)).T


def factored_log_normalizer(x: torch.Tensor) -> torch.Tensor:
    """log Σ exp over the 5121 logits of `factored_logits(x)`, from its FACTORED_WIDTH values: a class's tokens are
    every combination of its axes' values, so its log-sum-exp is its class value plus each axis's."""
    lse = [a.logsumexp(-1) for a in x[..., : 3 * _B + 3 * _O].split([_B] * 3 + [_O] * 3, -1)]
    blocks, offsets, cls = lse[0] + lse[1] + lse[2], lse[3] + lse[4] + lse[5], x[..., 3 * _B + 3 * _O :]
    return torch.stack([blocks + cls[..., 0], offsets + cls[..., 1], blocks + cls[..., 2], cls[..., 3]],
                       -1).logsumexp(-1)


def factored_argmax(x: torch.Tensor) -> torch.Tensor:
    """`factored_logits(x).argmax(-1)` from the FACTORED_WIDTH values: each class's best is the best value on every
    axis; the first best class (in token order) wins, as the argmax's first maximum does."""
    best = [a.max(-1) for a in x[..., : 3 * _B + 3 * _O].split([_B] * 3 + [_O] * 3, -1)]
    value = [best[i].values + best[i + 1].values + best[i + 2].values for i in (0, 3)]
    index = [(best[i].indices * size + best[i + 1].indices) * size + best[i + 2].indices
             for i, size in ((0, _B), (3, _O))]
    cls = x[..., 3 * _B + 3 * _O :]
    c = torch.stack([value[0] + cls[..., 0], value[1] + cls[..., 1], value[0] + cls[..., 2], cls[..., 3]],
                    -1).argmax(-1)
    first = torch.tensor([0, tok.OFFSET_BASE, tok.SPECIAL_BASE, tok.EOS], device=x.device)[c]
    within = torch.stack([index[0], index[1], index[0], torch.zeros_like(index[0])], -1).gather(-1, c[..., None])
    return first + within[..., 0]


# Per class (plain block, offset, special block): its axes (block or offset) and its first token id.
_CLASS_AXES = {tok.PLAIN: (0, tok.PLAIN), tok.OFFSET: (1, tok.OFFSET_BASE), tok.SPECIAL: (0, tok.SPECIAL_BASE)}


def _axes_best(y: list[float], start: int, size: int) -> tuple[float, int, float, float, int]:
    """Three axes of `size` values from y[start]: the best sum, its index in the class, the log-sum-exp of the sums,
    and the runner-up's loss and index (one axis at its second best: the one that loses least)."""
    value, index, lse, loss, second = 0.0, 0, 0.0, math.inf, 0
    for a in range(3):
        axis = y[start + a * size : start + (a + 1) * size]
        top = max(axis)
        i = axis.index(top)  # (the first maximum, as an argmax)
        rest = axis[:i] + axis[i + 1 :]
        j = rest.index(max(rest))
        j += j >= i
        value, index = value + top, index * size + i
        lse += top + math.log(sum([math.exp(v - top) for v in axis]))
        if top - axis[j] < loss:
            loss, stride = top - axis[j], size ** (2 - a)
            second = (j - i) * stride  # added to the best index later
    return value, index, lse, loss, index + second


def factored_best(y: list[float], classes: list[int], runner_up: bool) -> tuple[int, float, int]:
    """The best token of a factored output `y` (FACTORED_WIDTH values) among the token classes `classes`, the
    probability that the softmax of its 5121 logits (`factored_logits`, the other classes masked) gives it, and with
    `runner_up` the second best token (-1: none), all from the 76 values: a class's best is the best value on each
    of its axes, its runner-up that with one axis at its second best, and its log-sum-exp the sum of the axes'. Ties
    go to the lower token id, as an argmax over the logits does."""
    cls = y[3 * _B + 3 * _O :]
    groups = {}
    found = []  # per allowed class: (value, token, runner-up value, runner-up token, log-sum-exp)
    for c in classes:
        if c == tok.END:
            found.append((cls[c], tok.EOS, -math.inf, -1, cls[c]))
            continue
        group, base = _CLASS_AXES[c]
        if group not in groups:
            groups[group] = _axes_best(y, 3 * _B * group, _O if group else _B)
        value, index, lse, loss, second = groups[group]
        found.append((value + cls[c], base + index, value + cls[c] - loss, base + second, lse + cls[c]))
    value, token, second_value, second, _ = max(found, key=lambda f: (f[0], -f[1]))
    total = max(f[4] for f in found)
    total += math.log(sum(math.exp(f[4] - total) for f in found))
    if not runner_up:
        return token, math.exp(value - total), -1
    for f in found:  # the best class's runner-up or another class's best, whichever is higher
        if f[1] != token and (f[0], -f[1]) > (second_value, -second):
            second_value, second = f[0], f[1]
    return token, math.exp(value - total), second


def _float_weights(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear layer's (weight, bias) as plain tensors (an int8 layer's are behind methods)."""
    weight, bias = layer.weight, layer.bias
    return (weight().dequantize(), bias()) if callable(weight) else (weight, bias)


class _Inference(NamedTuple):
    feat: torch.Tensor  # (dim, dim) the first layer's feature columns
    tapped: torch.Tensor | None  # (dim, (1 + taps) dim) the same, then tap_fc with each tap norm's scale folded in
    tap_bias: torch.Tensor | None  # (dim,) tap_fc applied to the tap norms' shifts
    by_token: torch.Tensor  # (V, dim) its token part per token, the bias included
    by_pos: torch.Tensor | None  # (positions, dim) its position part per position
    qkv: torch.Tensor  # (3 dim, dim) the self-attention's q, k, v projections stacked


class DraftDecoder(nn.Module):
    reads_history = True  # the committed pairs `propose` reads: every one since its last call (the catch-up)

    def __init__(self, model_cfg: ModelConfig, cfg: HeadsConfig):
        super().__init__()
        if cfg.kind not in DECODER_KINDS or cfg.output not in OUTPUTS:
            raise ValueError(f"unknown draft decoder kind {cfg.kind!r} or output {cfg.output!r}")
        if cfg.output == "factored" and model_cfg.vocab_size != tok.VOCAB_SIZE:
            raise ValueError(f"factored output needs the BPT vocabulary of {tok.VOCAB_SIZE} tokens")
        self.cfg = cfg
        dim = model_cfg.dim
        self.model_cfg = dataclasses.replace(model_cfg, ff_mult=cfg.ff_mult)
        if cfg.positions and cfg.kind != "eagle":
            raise ValueError("position embeddings need the eagle kind (a grounded chain has no positions)")
        if cfg.taps and not 1 <= min(cfg.taps) <= max(cfg.taps) <= model_cfg.depth:
            raise ValueError(f"taps {cfg.taps} name layers outside the backbone's 1..{model_cfg.depth}")
        # [feature, token embedding, (position embedding)] -> block input (fc), plus the normalised tapped layers
        # (tap_fc); it starts as the feature alone and the block's residual branches at zero, so the untrained
        # drafter's first draft reads the (renormalised) backbone state: a sane start.
        self.fc = nn.Linear((3 if cfg.positions else 2) * dim, dim)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.weight[:, :dim].copy_(torch.eye(dim))
            self.fc.bias.zero_()
        self.tap_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in cfg.taps)
        self.tap_fc = nn.Linear(len(cfg.taps) * dim, dim, bias=False) if cfg.taps else None
        if self.tap_fc is not None:
            nn.init.zeros_(self.tap_fc.weight)
        self.block = DecoderBlock(self.model_cfg)
        for lin in (self.block.self_attn.to_out, self.block.cross_attn.to_out, self.block.ff.out):
            nn.init.zeros_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        self.out_norm = nn.LayerNorm(dim)
        self.to_axes = nn.Linear(dim, FACTORED_WIDTH) if cfg.output == "factored" else None

    @property
    def taps(self) -> tuple[int, ...]:
        return self.cfg.taps  # the backbone layers read besides the final state

    @property
    def num_heads(self) -> int:
        return self.cfg.num_heads  # the drafts trained for (the unroll length); more are possible, not better

    @property
    def factored(self) -> bool:  # (as `DraftHeads.factored`: every drafter says whether its outputs are axis values)
        return self.to_axes is not None

    def outputs(self, model: nn.Module, feats: torch.Tensor) -> torch.Tensor:
        """Token logits (V), or a factored output's FACTORED_WIDTH values."""
        return self.to_axes(feats) if self.factored else model.to_logits(feats)

    def _pairs(self, model: nn.Module, feats: torch.Tensor, tokens: torch.Tensor, pos: torch.Tensor,
               w: "_Inference | None" = None) -> torch.Tensor:
        """Block inputs for pairs at drafter positions `pos` (the position of the feature, which is the backbone's
        position index of the token): `feats` the backbone's (with taps) or the drafter's own (without). `w`: the
        caller's `_inference_weights`, where it has them."""
        dim = model.cfg.dim
        tokens, pos = tokens.clamp(min=0), pos.clamp(max=model.cfg.max_seq_len - 1)
        if torch.is_grad_enabled():
            parts = [feats[..., :dim], model.token_embed(tokens)]
            if self.cfg.positions:
                parts.append(model.pos_embed(pos).expand(*tokens.shape, -1))
            x = self.fc(torch.cat(parts, -1))
            if self.tap_fc is not None and feats.shape[-1] > dim:
                taps = feats[..., dim:].split(dim, -1)
                x = x + self.tap_fc(torch.cat([norm(t) for norm, t in zip(self.tap_norms, taps)], -1))
            return x
        # The same sum at inference, its token and position parts looked up and the taps' norms folded into one
        # product with the feature (`_inference_weights`).
        w = w or self._inference_weights(model)
        if w.tapped is not None and feats.shape[-1] > dim:
            taps = F.layer_norm(feats[..., dim:].unflatten(-1, (-1, dim)), (dim,), eps=self.tap_norms[0].eps)
            x = F.linear(torch.cat([feats[..., :dim], taps.flatten(-2)], -1), w.tapped, w.tap_bias)
        else:
            x = F.linear(feats[..., :dim], w.feat)
        x = x + w.by_token[tokens]
        return x if w.by_pos is None else x + w.by_pos[pos]

    def _inference_weights(self, model: nn.Module) -> "_Inference":
        """Weights rearranged for inference, made once (remade when one of them changes): the first layer split by
        input, fc([f, e(t), p(pos)]) = W_f f + T[t] + P[pos] with the tables T = W_e E + b (V, dim) and P = W_p P
        (positions, dim), the tap norms' scales and shifts folded into tap_fc and its product joined to W_f's, and the
        self-attention's q/k/v as one matrix. A draft then reads a dim x dim matrix and two table rows where it read a
        3 dim x dim one, and runs one product where it ran three (q/k/v; feature and taps): on a CPU a drafting step is
        bound by the bytes it reads and by its op count."""
        attn = self.block.self_attn
        layers = (self.fc, attn.to_q, attn.to_k, attn.to_v, *([self.tap_fc] if self.tap_fc is not None else []))
        params = [p for p in (*(m.weight for m in layers), *(p for n in self.tap_norms for p in (n.weight, n.bias)),
                              model.token_embed.weight, model.pos_embed.weight)
                  if isinstance(p, torch.Tensor)]  # (an int8 layer's weight is a method, and never changes)
        key = (*map(id, layers), *((p.data_ptr(), p._version, p.dtype) for p in params))
        if self.__dict__.get("_inference_key") != key:
            weight, bias = _float_weights(self.fc)
            table, dim = model.token_embed.weight, model.cfg.dim
            weight, bias = weight.to(table.dtype), bias.to(table.dtype)
            by_pos = F.linear(model.pos_embed.weight, weight[:, 2 * dim :]) if self.cfg.positions else None
            by_token = F.linear(table, weight[:, dim : 2 * dim], bias)
            qkv = torch.cat([_float_weights(m)[0] for m in layers[1:4]]).to(table.dtype)
            tapped = tap_bias = None
            if self.tap_fc is not None:  # tap_fc(norm(t)) = tap_fc((t - mean) / std * scale) + tap_fc(shift)
                taps = _float_weights(self.tap_fc)[0].to(table.dtype).split(dim, 1)
                norms = [(n.weight.to(table.dtype), n.bias.to(table.dtype)) for n in self.tap_norms]
                tapped = torch.cat([weight[:, :dim]] + [t * scale for t, (scale, _) in zip(taps, norms)], 1)
                tap_bias = sum(t @ shift for t, (_, shift) in zip(taps, norms))
            self.__dict__["_inference"] = _Inference(weight[:, :dim].contiguous(), tapped, tap_bias, by_token, by_pos,
                                                     qkv)
            self.__dict__["_inference_key"] = key
        return self.__dict__["_inference"]

    # -- decoding ----------------------------------------------------------------------------------------------
    def begin(self, model: nn.Module, cond: torch.Tensor, max_len: int) -> KVCache:
        """Per-mesh state: the drafter's own cache (one layer), its `cross` the block's keys/values over the
        condition."""
        cfg = self.model_cfg
        cache = KVCache(1, cond.shape[0], cfg.heads, max_len, cfg.head_dim, cond.device, cond.dtype)
        cache.cross = [self.block.cross_attn.context_kv(cond)]
        self._inference_weights(model)  # (checked once per mesh, not per step: the check costs a tenth of a draft)
        return cache

    def restart(self, model: nn.Module, ctx: KVCache, row: int, cond: torch.Tensor) -> None:
        """Row `row` taken over by a new sequence over `cond` (1, M, dim) (continuous batching): no history, its
        own condition."""
        ctx.restart(row, [self.block.cross_attn.context_kv(cond)])

    def keep(self, ctx: KVCache, rows: torch.Tensor) -> KVCache:
        """Only these rows (finished sequences leave the batch)."""
        ctx.keep(rows)
        return ctx

    def _extend(self, model, cache: KVCache, feats, tokens, counts, w: _Inference, same: bool) -> torch.Tensor:
        """Commit each row's first counts[b] pairs of feats/tokens (B, n, ·) to the drafter's cache; return the
        block's output at the last of them (B, dim). This is the block's forward (`DecoderBlock`, which training
        runs) cut to what a draft reads: keys and values for every new pair, the rest only at each row's last pair
        (a one-layer drafter's other outputs feed nothing), with the weights `w` of `_inference_weights`. `same`:
        every row has n pairs (its last pair is then the last slot, which sees every key of an equal-length batch)."""
        b, n = tokens.shape
        rows, last = torch.arange(b, device=tokens.device), counts - 1
        seq_pos = cache.lengths[:, None] + torch.arange(n, device=tokens.device)
        at = cache.prepare(seq_pos, last_only=same)
        block, attn, cross = self.block, self.block.self_attn, self.block.cross_attn
        x = self._pairs(model, feats, tokens, seq_pos, w)
        q, k, v = F.linear(block.self_norm(x), w.qkv).unflatten(-1, (3, attn.heads, -1)).unbind(2)
        keys, values = cache.write(0, at, F.normalize(k, dim=-1).transpose(1, 2), v.transpose(1, 2))
        if same:  # the last slot (a view): it sees every key of rows of equal length (no mask), else its mask row
            x, q, mask = x[:, -1:], q[:, -1, :, None], None if at.mask is None else at.mask[:, :, -1:]
        else:  # each row's last pair, and its row of the mask (B, 1, 1, keys)
            x, q = x[rows, last][:, None], q[rows, last][:, :, None]
            mask = None if at.mask is None else at.mask[rows, :, last][:, :, None]
        x = x + attn.attend(q, keys, values, mask)
        x = x + cross.attend(cross.split(cross.to_q(block.cross_norm(x))), *cache.cross[0], None)
        x = x + block.ff(block.ff_norm(x))
        cache.lengths += counts  # (padding past a row's own pairs is forgotten)
        return self.out_norm(x[:, 0])

    def _best(self, model: nn.Module, feats: torch.Tensor, walk: DraftWalk) -> torch.Tensor:
        """The greedy draft from the drafter's features (B, dim), grammar-masked, taken by `walk`. A factored output's
        is found from its 76 values on the host (`factored_best`): a few dozen microseconds of Python where making,
        masking and searching its 5121 logits takes some twenty tensor ops."""
        if not self.factored:
            return walk.best(model.to_logits(feats))
        second = walk.wants_runner_up
        found = [factored_best(y, walk.grammar.classes[s], second)
                 for y, s in zip(self.to_axes(feats).tolist(), walk.states[-1].tolist())]
        tokens, probs, seconds = zip(*found)
        return walk.pick(torch.tensor(tokens, device=feats.device), list(probs),
                         torch.tensor(seconds, device=feats.device) if second else None)

    def propose(self, model, cache: KVCache, feats, tokens, counts, drafts: int, walk: DraftWalk) -> torch.Tensor:
        """Up to `drafts` greedy draft tokens (B, k): fewer where `walk` ends the chain (its confidence stop).
        feats/tokens (B, n, ·): the pairs committed since the last call, counts[b] of them valid per sequence, the
        last being [h, r] (none for a finished sequence, whose drafts are ignored); `walk` keeps each draft to what
        the grammar allows after the ones before it. `cache`: from `begin`."""
        if self.cfg.kind == "grounded":
            rows, last = torch.arange(feats.shape[0], device=feats.device), counts - 1
            feats, tokens, counts = feats[rows, last][:, None], tokens[rows, last][:, None], torch.ones_like(counts)
            cache.rollback(torch.zeros_like(cache.lengths))
        w = self.__dict__.get("_inference")  # (made or checked by `begin`, once per mesh)
        if w is None:
            raise RuntimeError("DraftDecoder.propose needs the state `begin` makes: call begin first")
        counted = counts.tolist()
        n = max(counted)
        g = self._extend(model, cache, feats[:, :n], tokens[:, :n], counts, w, min(counted) == n)
        committed, one = cache.lengths.clone(), torch.ones_like(counts)
        out = []
        for k in range(drafts):
            out.append(self._best(model, g, walk))
            if walk.done:
                break
            if k + 1 < drafts:
                g = self._extend(model, cache, g[:, None], out[-1][:, None], one, w, True)
        cache.rollback(committed)  # the drafts' own entries are approximations: re-fed after the verify
        return torch.stack(out, 1) if out else tokens.new_zeros(feats.shape[0], 0)

    # -- training ----------------------------------------------------------------------------------------------
    def forward(self, model, hidden: torch.Tensor, inputs: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Teacher-forced, unrolled on the drafter's own features (training-time test): (B, T, D, ·) `outputs`,
        entry [:, j, k-1] predicting the token k positions after the backbone's next, as the paper's heads do.

        Unroll step s at chain start j reads [g_(s-1), t_(j+s)] (g_0 = the backbone's h_j) and attends to the
        step-1 entries at positions <= j (true features, as the cache holds at inference) plus its own chain's
        earlier entries; a grounded drafter sees its own chain only. The tokens are the sequence's: a draft only
        matters when the ones before it were accepted, i.e. equal to the sequence's tokens. `hidden`: the backbone's
        features, `model(..., taps=self.taps)`."""
        b, t, _ = hidden.shape
        dev = hidden.device
        cross = self.block.cross_attn.context_kv(cond)
        causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
        eye = torch.eye(t, dtype=torch.bool, device=dev)
        keys, values, out = [], [], []

        def kv(k, v):
            keys.append(k)
            values.append(v)
            return torch.cat(keys, 2), torch.cat(values, 2)

        feats = hidden
        for s in range(self.num_heads):
            tokens = torch.cat([inputs, inputs.new_zeros(b, s + 1)], 1)[:, s + 1 : s + 1 + t]  # t_(j+s+1)
            first = causal if self.cfg.kind == "eagle" else eye
            mask = torch.cat([first] + [eye] * s, 1)
            pos = torch.arange(s, s + t, device=dev)[None]
            feats = self.out_norm(self.block(self._pairs(model, feats, tokens, pos), cross, kv, mask))
            out.append(self.outputs(model, feats))
        return torch.stack(out, 2)


Drafter = DraftHeads | DraftDecoder


def build_drafter(model_cfg: ModelConfig, cfg: HeadsConfig) -> Drafter:
    if cfg.kind not in KINDS:
        raise ValueError(f"unknown drafter kind {cfg.kind!r}; choose one of {', '.join(KINDS)}")
    return DraftDecoder(model_cfg, cfg) if cfg.kind in DECODER_KINDS else DraftHeads(model_cfg, cfg)


def drafter_for_backbone(model: nn.Module, cfg: HeadsConfig) -> Drafter:
    """An untrained drafter for `model`. The paper's heads copy an own output projection from the backbone's; a
    factored output starts as the least-squares fit of the backbone's projection by per-axis and class rows, so
    training starts from the backbone's sense of the token space rather than from noise."""
    if cfg.kind not in DECODER_KINDS:
        return DraftHeads.for_backbone(model, cfg)
    drafter = DraftDecoder(model.cfg, cfg)
    if drafter.factored:
        with torch.no_grad():
            basis = factor_basis()
            full = torch.cat([model.to_logits.weight, model.to_logits.bias[:, None]], 1).float()
            fit = torch.linalg.pinv(basis) @ full  # (FACTORED_WIDTH, dim + 1); the basis is rank-deficient
            drafter.to_axes.weight.copy_(fit[:, :-1])
            drafter.to_axes.bias.copy_(fit[:, -1])
    return drafter


def grow(old: Drafter, cfg: HeadsConfig) -> DraftDecoder | None:
    """A draft decoder with config `cfg` that computes exactly what `old` does, when `cfg` only adds to it: inputs
    (the position embedding, taps where `old` had none), whose first-layer columns start at zero, feed-forward width
    (a larger `ff_mult`), whose new hidden units start with zero output weights (Net2Net's function-preserving
    widening: the new units train from there), or drafts to unroll (`num_heads`: the same weights run more steps).
    Everything else is copied. None when `cfg` is not such a growth of `old`'s config."""
    if not isinstance(old, DraftDecoder):
        return None
    was = old.cfg
    adds = (was.taps in ((), cfg.taps) and cfg.positions >= was.positions and cfg.ff_mult >= was.ff_mult
            and cfg.num_heads >= was.num_heads)
    grown = ("taps", "positions", "ff_mult", "num_heads")
    if not adds or dataclasses.replace(was, **{k: getattr(cfg, k) for k in grown}) != cfg:
        return None  # something removed, or another change (kind, output, ...)
    new = DraftDecoder(old.model_cfg, cfg)
    state = old.state_dict()
    with torch.no_grad():
        weight = state.pop("fc.weight")  # [feature, token, (position)]: a position column block is new
        new.fc.weight.zero_()[:, : weight.shape[1]].copy_(weight)
        # The GLU's projection is [value units; gate units]: the old units go first in each half, their output
        # columns too; the new ones keep their initial projection and get zero output columns.
        ff, width, inner = new.block.ff, old.block.ff.out.in_features, new.block.ff.out.in_features
        for name in ("weight", "bias"):
            for half, part in enumerate(state.pop(f"block.ff.proj.{name}").chunk(2)):
                getattr(ff.proj, name)[half * inner : half * inner + width] = part
        ff.out.weight.zero_()[:, :width] = state.pop("block.ff.out.weight")
    new.load_state_dict(state, strict=False)  # the rest, taps included where old had them; new ones stay at zero
    return new


def draft_outputs(drafter: Drafter, model: nn.Module, hidden, inputs, cond, call: nn.Module | None = None):
    """Teacher-forced draft outputs (B, T, D, ·) over whole sequences, any kind: token logits (V), or a factored
    drafter's FACTORED_WIDTH values (`drafter.factored`); `call` is the module to run (a DDP wrapper of `drafter` while
    training)."""
    call = call if call is not None else drafter
    if isinstance(drafter, DraftDecoder):
        return call(model, hidden, inputs, cond)
    return call(hidden, drafter.context(cond), model.to_logits)


def draft_logits(drafter: Drafter, model: nn.Module, hidden, inputs, cond) -> torch.Tensor:
    """Teacher-forced draft logits (B, T, D, V) over whole sequences, any kind."""
    out = draft_outputs(drafter, model, hidden, inputs, cond)
    return factored_logits(out) if drafter.factored else out
