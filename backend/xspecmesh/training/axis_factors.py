"""Per-axis factors for the token table: a training-time reparametrization, merged away on save.

A BPT token names three axis values at once (a block token bx, by, bz in 8 each; an offset token ox, oy, oz in 16
each), but the embedding and the output projection give every one of the 4096 offsets and 512 blocks its own row,
so what the model learns about "x offset 5" in one token does not reach the 255 others that share it. With
`--axis-factors` each row is written as its own row plus one shared row per axis value:

    row(token) = full(token) + axis_x(value_x) + axis_y(value_y) + axis_z(value_z)

for the embedding, the output projection's weight and its bias alike. Plain and patch-start blocks share their
block-axis rows (the type vector tells them apart); EOS has no axes. The factors start at zero, so a loaded model's
function is unchanged at step 0. The sum is linear, so merging it into the full rows (`merged`) is exact and the
saved checkpoint has the plain BPT layout.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from xspecmesh.geometry import tokenizer as tok

# Rows of the factor table: 3 axes x 8 block values, then 3 axes x 16 offset values, then a zero row (no axis).
BLOCK_ROWS = 3 * tok.BLOCK_SIZE
NULL_ROW = BLOCK_ROWS + 3 * tok.OFFSET_SIZE
FACTORED = ("token_embed.weight", "to_logits.weight", "to_logits.bias")


def axis_rows(vocab_size: int) -> np.ndarray:
    """(vocab_size, 3): for every token id, its factor-table row on each axis (NULL_ROW where it has none)."""
    rows = np.full((vocab_size, 3), NULL_ROW, dtype=np.int64)
    ids = np.arange(vocab_size)
    blocks, offsets = tok.is_block(ids) | tok.is_special(ids), tok.is_offset(ids)
    rows[blocks] = tok.block_axes(ids[blocks] % tok.SPECIAL_BASE) + np.arange(3) * tok.BLOCK_SIZE
    rows[offsets] = BLOCK_ROWS + tok.offset_axes(ids[offsets]) + np.arange(3) * tok.OFFSET_SIZE
    return rows


class AxisFactors(nn.Module):
    """The parametrization: full rows (vocab, ...) -> full rows + the sum of their three axis rows."""

    def __init__(self, full: torch.Tensor):
        super().__init__()
        self.register_buffer("rows", torch.from_numpy(axis_rows(full.shape[0])).to(full.device), persistent=False)
        self.table = nn.Parameter(full.new_zeros(NULL_ROW, *full.shape[1:]))

    def forward(self, full: torch.Tensor) -> torch.Tensor:
        table = torch.cat([self.table, self.table.new_zeros(1, *self.table.shape[1:])])  # NULL_ROW adds nothing
        return full + table[self.rows].sum(dim=1)


def add_axis_factors(model: nn.Module) -> nn.Module:
    """Give the token embedding and the output projection (weight and bias) per-axis factors, in place."""
    for name in FACTORED:
        module, attr = name.rsplit(".", 1)
        module = model.get_submodule(module)
        parametrize.register_parametrization(module, attr, AxisFactors(getattr(module, attr)))
    return model


def merged(model: nn.Module) -> nn.Module:
    """A plain copy with the factors summed into the full rows: same function, no factors.

    (Built fresh and loaded, not deep-copied: a deep copy of a parametrized module shares its parametrizations.)"""
    state = {k: v for k, v in model.state_dict().items() if ".parametrizations." not in k}
    with torch.no_grad():
        for name in FACTORED:
            module, attr = name.rsplit(".", 1)
            state[name] = getattr(model.get_submodule(module), attr).detach().clone()
    out = type(model)(model.cfg).to(next(model.parameters()).device)
    out.load_state_dict(state)
    return out
