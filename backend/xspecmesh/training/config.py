"""`TrainConfig`, apart from the trainer so that `xspecmesh --help` builds the train options without importing torch."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    stage: str = "backbone"  # backbone | heads | lora
    out: str = "runs/backbone"
    preset: str = "small"  # backbone stage without --init
    init: str | None = None  # checkpoint to start from (required for heads and lora)
    heads_init: str | None = None  # heads: start the drafter from this checkpoint's (another backbone of --init's shape)
    steps: int = 20000
    token_budget: int = 4096  # tokens per micro-batch (sequences bucketed by length)
    grad_accum: int = 1
    lr: float = 5e-4
    warmup: int = 300
    min_lr_ratio: float = 0.1  # cosine decay down to lr * this
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    max_faces: int = 400
    families: str | None = None  # comma-separated procedural families and groups (default: the general mix)
    axis_aligned: bool = False  # shapes upright and turned by multiples of 90 degrees only (data.ShapeConfig)
    axis_turns: int = 4  # with axis_aligned: 4 turns about up, or all 24 quarter-turn rotations
    axis_factors: bool = False  # backbone: token rows get shared per-axis rows while training (axis_factors.py)
    meshes: str | None = None  # an optional directory of the user's own meshes, mixed in
    seed: int = 0
    eval_every: int = 500
    save_every: int = 200
    val_count: int = 32  # validation pairs for loss/accuracy
    gen_count: int = 4  # AR generations scored with Chamfer distance at each evaluation
    # heads / lora
    num_heads: int = 6
    head_type: str = "cross"  # cross (the paper's cross-attention heads) | mlp (the ablation) | eagle | grounded
    head_ff_mult: int = 1  # feed-forward width of the heads / the draft decoder's block, times the model width
    head_taps: str = ""  # eagle/grounded: backbone layers (comma-separated, 1-based) the drafter also reads (EAGLE-3)
    head_positions: bool = False  # eagle: the drafter's pairs carry the backbone's position embedding
    head_full_vocab: bool = False  # eagle/grounded: the backbone's output projection instead of per-axis logits
    # stages heads and lora: share of micro-batches replaced by the backbone's own AR samples; in stage lora they carry
    # the drafter's loss alone (the λ-weighted cross-entropy to them would sharpen the backbone towards its own samples)
    self_samples: float = 0.0
    # ... decoded this many micro-batches at a time (one AR decode over all their shapes: on a GPU a decode of many
    # sequences costs about what one of a few does; a frozen backbone's samples drawn ahead are as good, and stage lora's
    # adapters move it little)
    sample_pool: int = 1
    # ... or read from this file (`xspecmesh dataset samples`: decoded once, ahead, by this backbone), not decoded here
    sample_file: str = ""
    head_own_output: bool = False  # heads get their own output projection (started as a copy of the backbone's)
    head_decay: float = 0.8  # head k's loss weight is decay**(k-1)
    ce_weight: float = 0.1  # plus cross-entropy to the true token (0 = pure distillation)
    # the teacher the drafter matches is the backbone's distribution at this temperature: every acceptance rule tests
    # drafts against the sampling distribution (the add-on samples at 0.5), which puts its mass on the backbone's top
    teacher_temperature: float = 1.0
    lora_rank: int = 16
    lora_alpha: int = 32
    backbone_weight: float = 50.0  # λ: weight of the backbone's own loss in stage 2
    resume: bool = False
    log_every: int = 10
    device: str = "auto"  # auto (cuda when there is one), cpu or cuda
    threads: int = 0  # torch CPU threads (0: torch's choice); 1 on a shared machine
    workers: int = 0  # data-loader processes drawing shapes (0: in the training process); a GPU needs several
    stop_at: int = 0  # end this run at this step (0: at `steps`); the schedule still runs to `steps` (legs, phases)
    max_minutes: float = 0.0  # end this run, saved, once it has trained this long (0: no limit)
