"""Model configurations: dataclasses with commented defaults and named presets.

`tiny` is for tests (builds in milliseconds), `small` is the shipped default (trains on a 2-core CPU in hours),
`bpt` is exactly the published 500M BPT configuration (so its checkpoint loads through the same code).
A checkpoint carries its config as JSON; nothing is inferred from file names.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field

from xspecmesh.errors import SettingsError


@dataclass
class EncoderConfig:
    """Michelangelo-style perceiver over a point cloud with normals."""

    num_points: int = 4096  # points fed to the encoder (inputs are resampled to this)
    num_latents: int = 257  # learned queries; latent 0 is the global "shape" token
    width: int = 768
    heads: int = 12
    depth: int = 8  # self-attention blocks after the single cross-attention
    num_freqs: int = 8  # Fourier features 2^0..2^(n-1), input included: 3 + 3*2*n values
    fourier_pi: bool = True  # frequencies multiplied by pi (Michelangelo's default embedder)
    mlp_ratio: int = 4  # hidden width of the perceiver's GELU MLPs
    # Parts of the published checkpoint that BPT never runs (KL bottleneck, decoder transformer, geometry decoder).
    # Only the `bpt` preset sets these; they size the key list the converter expects and ignores.
    unused_kl_channels: int = 0
    unused_decoder_depth: int = 0


@dataclass
class ModelConfig:
    """BPT decoder: pre-LN blocks of causal self-attention, cross-attention to the condition, GLU-GELU MLP."""

    vocab_size: int = 5121  # 512 blocks + 4096 offsets + 512 special blocks + EOS
    dim: int = 1024
    depth: int = 24
    heads: int = 16  # head dim = dim // heads
    ff_mult: int = 4
    max_seq_len: int = 10000  # learned absolute positions
    cosine_scale: float = 10.0  # q/k are L2-normalised per head, logits scaled by this fixed value
    num_mem_kv: int = 4  # learned memory key/values per head, cross-attention only
    encoder: EncoderConfig = field(default_factory=EncoderConfig)

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        enc = EncoderConfig(**d.pop("encoder", {}))
        return cls(**d, encoder=enc)

    @classmethod
    def from_json(cls, s: str) -> "ModelConfig":
        return cls.from_dict(json.loads(s))


@dataclass
class HeadsConfig:
    """The drafter: the paper's heads (head k reads the backbone's last hidden state and predicts token t+k) or one
    of our draft decoders, which also read the tokens fixed before each draft (model/drafter.py)."""

    num_heads: int = 4  # D (a draft decoder: the drafts it is trained to unroll)
    # "cross" (the paper's cross-attention heads), "mlp" (their ablation), "eagle" (a one-block draft decoder with
    # its own KV cache over the history) or "grounded" (the same block over the current step's chain only)
    kind: str = "cross"
    ff_mult: int = 1  # feed-forward width as a multiple of the model width
    attn_dim: int = 128  # width of each head's cross-attention (0 = the model width; paper heads only)
    # reuse the backbone's output projection (an own one costs D x dim x vocab); paper heads only
    shared_output: bool = True
    # draft decoders: "factored" per-axis logits (3 x 8 block + 3 x 16 offset values + 4 classes, summed into the
    # vocabulary: 76 outputs instead of 5121) or "shared" (the backbone's output projection)
    output: str = "shared"
    # draft decoders, EAGLE-3 style: the backbone layers (1-based) whose outputs the committed pairs carry besides
    # the final state, and whether the pairs carry the backbone's position embedding
    taps: tuple[int, ...] = ()
    positions: bool = False

    def __post_init__(self):
        self.taps = tuple(sorted(int(t) for t in self.taps))  # (a list when read from JSON)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "HeadsConfig":
        return cls(**json.loads(s))


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        dim=32, depth=2, heads=2, ff_mult=2, max_seq_len=1024,
        encoder=EncoderConfig(num_points=128, num_latents=9, width=32, heads=2, depth=1, num_freqs=4),
    ),
    # ~10.4M parameters: with six light heads the fp16 checkpoint stays under 25 MB.
    "small": ModelConfig(
        dim=256, depth=6, heads=4, ff_mult=2, max_seq_len=2048,
        encoder=EncoderConfig(num_points=2048, num_latents=65, width=256, heads=4, depth=2, num_freqs=8, mlp_ratio=2),
    ),
    "bpt": ModelConfig(
        encoder=EncoderConfig(unused_kl_channels=64, unused_decoder_depth=16),
    ),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise SettingsError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
