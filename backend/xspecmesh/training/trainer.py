"""Training: the backbone on procedural shapes, then the paper's two distillation stages for the drafting heads.

    backbone  next-token cross-entropy, from scratch (or --init)
    heads     stage 1: backbone frozen; head k learns the backbone's distribution k positions further on (KL), with
              loss weights decaying exponentially in k. A draft decoder (--head-type eagle|grounded) is unrolled
              over its own features while it learns (model/drafter.py), and --self-samples mixes in sequences the
              backbone sampled itself at the add-on's default temperature (the sequences it will have to guess)
    lora      stage 2: peft LoRA adapters on the backbone's projections trained jointly with the heads; the backbone's
              own cross-entropy weighted λ keeps its distribution in place (on true sequences only: --self-samples
              batches carry the drafter's loss alone); LoRA is merged before saving

Runs the same under `torchrun --nproc_per_node=N` (DDP; NCCL on GPU, gloo on CPU). Checkpoints are safetensors:
`<out>/model.safetensors` (inference) and `<out>/state.safetensors` (weights in fp32 + optimizer, for --resume).
"""
from __future__ import annotations

import dataclasses
import json
from contextlib import nullcontext
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from xspecmesh.geometry import tokenizer as tok
from xspecmesh.training import sample_file
from xspecmesh.training.axis_factors import add_axis_factors, merged
from xspecmesh.model.checkpoint import load_checkpoint, save_checkpoint
from xspecmesh.model.config import HeadsConfig, preset
from xspecmesh.training.data import ShapeConfig, TrainingPair, iter_pairs, load_mesh_dir, validation_pairs
from xspecmesh.errors import CheckpointError, SettingsError
from xspecmesh.training.config import TrainConfig
from xspecmesh.model.drafter import (DECODER_KINDS, KINDS, draft_outputs, drafter_for_backbone, factor_basis,
                                     factored_argmax, factored_log_normalizer, grow)
from xspecmesh.model.transformer import MeshTransformer

# The decoder's attention and feed-forward projections (the point encoder keeps its weights).
LORA_TARGETS = r"layers\.\d+\.((self_attn|cross_attn)\.(to_q|to_k|to_v|to_out)|ff\.(proj|out))"


# ---------------------------------------------------------------------------------------------- data


def collate(pairs: list[TrainingPair]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """inputs (B, L+1) with BOS at 0, targets (B, L+1) ending in EOS (-1, ignored, after a sample that did not end)
    and padded with -1, points (B, N, 6)."""
    length = max(len(p.tokens) for p in pairs) + 1
    inputs = torch.zeros(len(pairs), length, dtype=torch.long)
    targets = torch.full((len(pairs), length), -1, dtype=torch.long)
    for i, p in enumerate(pairs):
        t = torch.as_tensor(p.tokens, dtype=torch.long)
        inputs[i, 1 : len(t) + 1] = t
        targets[i, : len(t)] = t
        targets[i, len(t)] = tok.EOS if p.ended else -1
    points = torch.from_numpy(np.stack([p.points for p in pairs]))
    return inputs, targets, points


def batches(pairs, token_budget: int, pool: int | None = None):
    """Length-bucketed micro-batches of at most `token_budget` padded tokens from an endless pair stream, sorted in a
    pool of `pool` pairs (default: 64, more for budgets that hold more than 64 sequences of 64 tokens)."""
    pool = pool or max(64, token_budget // 64)
    buf: list[TrainingPair] = []
    for pair in pairs:
        buf.append(pair)
        if len(buf) < pool:
            continue
        buf.sort(key=lambda p: len(p.tokens))
        batch: list[TrainingPair] = []
        while buf:
            nxt = buf[0]
            if batch and (len(batch) + 1) * (len(nxt.tokens) + 1) > token_budget:
                break
            batch.append(buf.pop(0))
        yield collate(batch)


def shape_config(cfg: TrainConfig) -> ShapeConfig:
    return ShapeConfig.parse(cfg.families, max_faces=cfg.max_faces, axis_aligned=cfg.axis_aligned,
                             axis_turns=cfg.axis_turns)


class _PairStream(torch.utils.data.IterableDataset):
    """The procedural stream of one rank, split over data-loader workers (each its own `iter_pairs` worker)."""

    def __init__(self, seed: int, shapes: ShapeConfig, num_points: int, rank: int, workers: int):
        super().__init__()
        self.args, self.rank, self.workers = (seed, shapes, num_points), rank, workers

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        seed, shapes, num_points = self.args
        worker = self.rank * max(1, self.workers) + (info.id if info else 0)
        return iter_pairs(seed, shapes, num_points=num_points, augment=True, worker=worker)


def _as_is(pair: TrainingPair) -> TrainingPair:  # the loader's default would turn numpy arrays into tensors
    return pair


def training_pairs(cfg: TrainConfig, num_points: int, rank: int, start_step: int = 0):
    """Endless pairs for one rank; a resumed run draws a new stream (seeded by its start step), not a replay."""
    stream = _PairStream(cfg.seed + 7919 * start_step, shape_config(cfg), num_points, rank, cfg.workers)
    procedural = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.workers,
                                                  prefetch_factor=64 if cfg.workers else None,
                                                  collate_fn=_as_is) if cfg.workers else stream)
    if not cfg.meshes:
        yield from procedural
        return
    files, _ = load_mesh_dir(cfg.meshes, num_points=num_points, seed=cfg.seed + rank)
    rng = np.random.default_rng(cfg.seed + 1000 + rank)
    for pair in procedural:  # half procedural, half the user's files
        yield pair
        if files:
            yield files[rng.integers(len(files))]


# An own sample stops at this many tokens per face of the shapes' cap (parts take ~2.9 tokens a face).
SAMPLE_TOKENS_PER_FACE = 3


@torch.no_grad()
def own_sequences(model, cond: torch.Tensor, max_tokens: int, generator=None) -> list[TrainingPair]:
    """The backbone's own AR samples for these conditions at the add-on's default sampling settings: the sequences a
    drafter has to guess at inference, stopped where the engine would stop them as stalled (pairs without points;
    `ended` False for a sample stopped there or at the token limit). A stalled sample is stopped as it stalls, not
    decoded on to the limit: it would hold up its whole batch."""
    from xspecmesh.decoding.autoregressive import decode_ar, token_limit
    from xspecmesh.decoding.engine import Decoded
    from xspecmesh.decoding.token_sampling import SamplingConfig

    limit = token_limit(model, max_tokens)
    finished = torch.zeros(len(cond), dtype=torch.bool, device=cond.device)
    seqs = [Decoded(None, limit) for _ in range(len(cond))]
    for accepted in decode_ar(model, cond, SamplingConfig(), max_tokens, generator, finished=finished):
        for i, (seq, new) in enumerate(zip(seqs, accepted)):
            if new:  # (a stopped row gets none)
                seq.add(new)
                if seq.stalled:
                    finished[i] = True  # the decoder stops it from the next step
    return [TrainingPair(np.asarray(s.tokens, dtype=np.int64), np.zeros((0, 6), np.float32), "sample",
                         ended=not s.stalled and len(s.tokens) < limit) for s in seqs]


def own_samples(model, cond: torch.Tensor, max_tokens: int, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`own_sequences` as (inputs, targets) like `collate`'s."""
    inputs, targets, _ = collate(own_sequences(model, cond, max_tokens, generator))
    return inputs.to(cond.device), targets.to(cond.device)


# ---------------------------------------------------------------------------------------------- losses


def head_distillation_loss(head_out, teacher_logits, targets, decay: float, ce_weight: float,
                           factored: bool = False, temperature: float = 1.0):
    """Head k at position j matches the backbone's distribution at position j+k (KL; at `temperature`), plus optional
    CE to the true token there. Returns the weighted loss and per-head top-1 agreement with the backbone.

    `head_out`: `draft_outputs`, token logits or with `factored` a factored drafter's values, whose loss is worked
    out from them in closed form, the same numbers without the drafts' (B, T, D, V) logits (on a CPU those and their
    gradients took more than half of a training step): with the token logits z = x @ basis.T (`factor_basis`),
    log s(v) = z_v - log Z(x), so KL(t || s) = log Z(x) - <t @ basis, x> - H(t) and
    -log s(y) = log Z(x) - basis[y] . x."""
    d = head_out.shape[2]
    total, weights, agree = 0.0, 0.0, []
    teacher_logp = (teacher_logits.float() / temperature).log_softmax(-1)
    if factored:
        # (floored at e^-80, ~1e-35: below it exp takes a slow path on a CPU, 3x the time of the whole sharp (T 0.125)
        # distribution's exp, for a mass below 1e-31 in all)
        teacher_p = teacher_logp.clamp(min=-80.0).exp()
        basis = factor_basis(teacher_p.device)
        marginals = teacher_p @ basis  # (B, T, FACTORED_WIDTH): the teacher's mass on each class and axis value
        entropy = -(teacher_p * teacher_logp).sum(-1)
        teacher_best = teacher_logits.argmax(-1)
    for k in range(1, d + 1):
        valid = targets[:, k:] >= 0
        if factored:
            x = head_out[:, :-k, k - 1].float()[valid]
            log_z = factored_log_normalizer(x)
            kl = (log_z - (marginals[:, k:][valid] * x).sum(-1) - entropy[:, k:][valid]).mean()
            nll = (log_z - (basis[targets[:, k:][valid]] * x).sum(-1)).mean() if ce_weight else 0.0
            hits = factored_argmax(x) == teacher_best[:, k:][valid]
        else:
            s = head_out[:, :-k, k - 1].float().log_softmax(-1)[valid]
            t = teacher_logp[:, k:][valid]
            kl = F.kl_div(s, t, log_target=True, reduction="batchmean")
            nll = F.nll_loss(s, targets[:, k:][valid]) if ce_weight else 0.0
            hits = s.argmax(-1) == t.argmax(-1)
        w = decay ** (k - 1)
        total, weights = total + w * (kl + ce_weight * nll), weights + w
        agree.append(hits.float().mean().item() if len(hits) else 0.0)
    return total / weights, agree


# ---------------------------------------------------------------------------------------------- state


def save_state(path: Path, modules: dict, optimizer, step: int, cfg: TrainConfig) -> None:
    tensors = {}
    for prefix, m in modules.items():
        for k, v in m.state_dict().items():
            tensors[f"{prefix}.{k}"] = v.detach().float().cpu().contiguous()
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for k, v in st.items():
            tensors[f"opt.{idx}.{k}"] = torch.as_tensor(v).float().cpu().contiguous()
    meta = {"step": str(step), "config": json.dumps(dataclasses.asdict(cfg)),
            "param_groups": json.dumps(opt["param_groups"])}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load_state(path: Path, modules: dict, optimizer) -> int:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for prefix, m in modules.items():
        sd = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        m.load_state_dict(sd)
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return int(meta["step"])


# ---------------------------------------------------------------------------------------------- trainer


class Trainer:
    def __init__(self, cfg: TrainConfig):
        if cfg.stage not in ("backbone", "heads", "lora"):
            raise SettingsError(f"unknown stage {cfg.stage!r}")
        if cfg.head_type not in KINDS:
            raise SettingsError(f"unknown --head-type {cfg.head_type!r}; choose one of {', '.join(KINDS)}")
        if not 0.0 <= cfg.self_samples <= 1.0:
            raise SettingsError(f"--self-samples is a share between 0 and 1, got {cfg.self_samples}")
        if cfg.sample_pool < 1:
            raise SettingsError(f"--sample-pool is a number of micro-batches, 1 or more, got {cfg.sample_pool}")
        if cfg.self_samples > 0 and cfg.stage == "backbone":
            raise SettingsError("--self-samples trains a drafter: it is for stages heads and lora")
        if cfg.sample_file and not cfg.self_samples > 0:
            raise SettingsError("--sample-file is where --self-samples takes its share from: it needs both")
        if not cfg.teacher_temperature > 0:
            raise SettingsError(f"--teacher-temperature must be above 0, got {cfg.teacher_temperature}")
        if cfg.axis_factors and cfg.stage != "backbone":
            raise SettingsError("--axis-factors is for the backbone stage (the heads read the merged rows)")
        self.cfg = cfg
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        if cfg.device not in ("auto", "cpu", "cuda"):
            raise SettingsError(f"--device is auto, cpu or cuda, got {cfg.device!r}")
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise SettingsError("--device cuda, but torch sees no CUDA device")
        if min(cfg.threads, cfg.workers, cfg.stop_at, cfg.max_minutes) < 0:
            raise SettingsError("--threads, --workers, --stop-at and --max-minutes must be 0 or more")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        shape_config(cfg)  # bad data options fail here, before a model is built
        cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        self.device = torch.device(f"cuda:{self.rank % torch.cuda.device_count()}" if cuda else "cpu")
        torch.manual_seed(cfg.seed)
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._build()

    # -- models ------------------------------------------------------------------------------------------------
    def _build(self) -> None:
        cfg = self.cfg
        self.preset_name = cfg.preset
        if cfg.stage == "backbone" and not cfg.init:
            self.model, self.heads = MeshTransformer(preset(cfg.preset)), None
        elif cfg.stage == "backbone":
            ckpt = load_checkpoint(cfg.init)
            self.model, self.heads, self.preset_name = ckpt.model, None, ckpt.meta.get("preset")
        else:
            if not cfg.init:
                raise SettingsError(f"stage {cfg.stage} needs --init CHECKPOINT (a trained backbone)")
            ckpt = load_checkpoint(cfg.init)
            self.model, self.preset_name = ckpt.model, ckpt.meta.get("preset")
            factored = cfg.head_type in DECODER_KINDS and not cfg.head_full_vocab
            hcfg = HeadsConfig(num_heads=cfg.num_heads, kind=cfg.head_type, ff_mult=cfg.head_ff_mult,
                               shared_output=not cfg.head_own_output, output="factored" if factored else "shared",
                               taps=[int(t) for t in cfg.head_taps.split(",") if t.strip()],
                               positions=cfg.head_positions)
            start = ckpt.heads
            if cfg.heads_init:  # a drafter trained on another backbone (e.g. the one this backbone was tuned from)
                if cfg.stage != "heads":
                    raise SettingsError("--heads-init is for stage heads; stage lora continues --init's heads")
                source = load_checkpoint(cfg.heads_init)
                if source.heads is None or source.model.cfg != ckpt.model.cfg:
                    raise SettingsError(f"--heads-init {cfg.heads_init} needs a drafter on a backbone of --init's "
                                        f"config; it has {'no drafter' if source.heads is None else source.model.cfg}")
                start = source.heads
            keep = start is not None and start.cfg == hcfg
            if cfg.stage == "lora" and not keep:
                found = start.cfg if start is not None else "no heads"
                raise SettingsError(f"stage lora continues the stage-1 heads, but {cfg.init} has {found}; "
                                    f"pass the heads checkpoint and the same --num-heads/--head-type")
            # A drafter that only gains inputs (taps, positions) or feed-forward width goes on from the start's,
            # computing the same.
            self.heads = start if keep else grow(start, hcfg) or drafter_for_backbone(self.model, hcfg)
        if cfg.axis_factors:
            add_axis_factors(self.model)
        self.model.to(self.device)
        if self.heads is not None:
            self.heads.to(self.device)
        if cfg.stage == "heads":
            self.model.requires_grad_(False).eval()
        self.peft = None
        if cfg.stage == "lora":
            from peft import LoraConfig, get_peft_model

            self.peft = get_peft_model(self.model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                                              target_modules=LORA_TARGETS))
            self.model = self.peft.get_base_model()  # same modules, now carrying the adapters
        self.trainable = [p for p in self.modules().values() for p in p.parameters() if p.requires_grad]
        self.ddp = {}
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = {name: DDP(m) for name, m in self.modules().items()
                        if any(p.requires_grad for p in m.parameters())}
        decay = [p for p in self.trainable if p.ndim >= 2]
        no_decay = [p for p in self.trainable if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(0.9, 0.95))

    def modules(self) -> dict:
        return {"model": self.model} | ({"heads": self.heads} if self.heads is not None else {})

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    # -- one micro-batch ---------------------------------------------------------------------------------------
    def loss(self, inputs, targets, points, own: bool = False) -> tuple[torch.Tensor, dict]:
        """One micro-batch's loss and log; `own`: the sequences are the backbone's own samples, which in stage lora
        teach the drafter only (see TrainConfig.self_samples)."""
        model = self.ddp.get("model", self.model)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        with amp:
            if self.cfg.stage == "heads":
                with torch.no_grad():
                    cond = self.model.encode(points)
                    logits, hidden = self.model(inputs, cond=cond, taps=self.taps)
            else:
                cond = model.module.encode(points) if self.ddp.get("model") else self.model.encode(points)
                logits, hidden = self._forward(model, inputs, cond, self.taps)
            ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
            if self.cfg.stage == "backbone":
                acc = (logits.argmax(-1) == targets)[targets >= 0].float().mean().item()
                return ce, {"loss": ce.item(), "acc": acc}
            if self.cfg.stage == "heads":
                hidden, cond = hidden.detach(), cond.detach()
            head_out = draft_outputs(self.heads, self.model, hidden, inputs, cond, self.ddp.get("heads"))
            distill, agree = head_distillation_loss(head_out, logits.detach(), targets, self.cfg.head_decay,
                                                    self.cfg.ce_weight, self.heads.factored,
                                                    self.cfg.teacher_temperature)
        loss = distill if self.cfg.stage == "heads" or own else distill + self.cfg.backbone_weight * ce
        return loss, {"loss": loss.item(), "distill": distill.item(), "ce": ce.item(),
                      **{f"agree{k + 1}": a for k, a in enumerate(agree)}}

    @staticmethod
    def _forward(model, inputs, cond, taps=()):
        return model(inputs, cond=cond, taps=taps)

    @property
    def taps(self) -> tuple[int, ...]:
        """The backbone layers the drafter reads besides the final state."""
        return self.heads.taps if self.heads is not None else ()

    def sampled_batches(self, points: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The backbone's own samples (inputs, targets) for each micro-batch of shapes in `points`, decoded as one
        batch, each cut to its own longest sample."""
        was_training = self.model.training
        self.model.eval()
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed + self.sample_draws)
        self.sample_draws += 1
        with torch.no_grad():
            inputs, targets = own_samples(self.model, self.model.encode(torch.cat(points)),
                                          SAMPLE_TOKENS_PER_FACE * self.cfg.max_faces, gen)
        self.model.train(was_training)
        out, start = [], 0
        for p in points:
            rows = slice(start, start + len(p))
            width = int((targets[rows] >= 0).any(0).nonzero().max()) + 1
            out.append((inputs[rows, :width], targets[rows, :width]))
            start += len(p)
        return out

    # -- loop --------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        state_path = self.out / "state.safetensors"
        step = 0
        if cfg.resume and state_path.exists():
            step = load_state(state_path, self.modules(), self.optimizer)
        self.start_step = step
        num_points = self.model.cfg.encoder.num_points
        stream = batches(training_pairs(cfg, num_points, self.rank, step), cfg.token_budget)
        log = (self.out / "log.jsonl").open("a") if self.rank == 0 else None
        bar = tqdm(total=cfg.steps, initial=step, disable=self.rank != 0, desc=f"train {cfg.stage}")
        last: dict = {}
        tokens_seen, t0 = 0, time.perf_counter()
        sample_rng = np.random.default_rng(cfg.seed + 104729 * step)
        self.sample_draws = step
        own: list = []  # own-sample micro-batches drawn ahead (--sample-pool): (inputs, targets, points)
        if cfg.sample_file:  # decoded ahead: micro-batches of them in a new order (by seed, step and rank)
            own_file = batches(sample_file.endless(sample_file.read(cfg.sample_file, self.model),
                                                   cfg.seed + 7919 * step + 104723 * self.rank), cfg.token_budget)
        end = min(cfg.steps, cfg.stop_at or cfg.steps)
        while step < end:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(step)
            self.optimizer.zero_grad(set_to_none=True)
            for _ in range(cfg.grad_accum):
                own_turn = sample_rng.random() < cfg.self_samples  # (0 in stage backbone: refused above)
                source = own_file if own_turn and cfg.sample_file else stream  # (a file's turn draws no true batch)
                inputs, targets, points = (t.to(self.device) for t in next(source))
                if own_turn and not cfg.sample_file:  # decoded here, for this micro-batch's shapes (and a pool's)
                    if not own:
                        shapes = [points] + [next(stream)[2].to(self.device) for _ in range(cfg.sample_pool - 1)]
                        own = [(*batch, p) for batch, p in zip(self.sampled_batches(shapes), shapes)]
                    inputs, targets, points = own.pop(0)
                loss, last = self.loss(inputs, targets, points, own_turn)
                (loss / cfg.grad_accum).backward()
                tokens_seen += int((targets >= 0).sum())
            torch.nn.utils.clip_grad_norm_(self.trainable, cfg.grad_clip)
            self.optimizer.step()
            step += 1
            bar.update(1)
            if self.rank == 0 and step % cfg.log_every == 0:
                rate = tokens_seen * self.world / (time.perf_counter() - t0)
                row = {"step": step, "lr": self.lr_at(step), "tokens_per_second": round(rate, 1),
                       **{k: round(v, 5) for k, v in last.items()}}
                bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{rate:.0f}")
                log.write(json.dumps(row) + "\n")
                log.flush()
            out_of_time = bool(cfg.max_minutes) and time.perf_counter() - t0 > 60 * cfg.max_minutes
            if self.distributed and cfg.max_minutes:  # every rank stops at the same step
                flag = torch.tensor([float(out_of_time)], device=self.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                out_of_time = bool(flag.item())
            if self.rank == 0 and (step % cfg.save_every == 0 or step == end or out_of_time):
                self.save(step)
            if self.rank == 0 and cfg.eval_every and (step % cfg.eval_every == 0 or step == end or out_of_time):
                ev = self.evaluate()
                log.write(json.dumps({"step": step, **{f"val_{k}": v for k, v in ev.items()}}) + "\n")
                log.flush()
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in ev.items()))
            if out_of_time:
                break
        bar.close()
        if self.distributed:
            dist.barrier()
        self.step = step
        return last

    # -- saving and evaluation ---------------------------------------------------------------------------------
    def inference_modules(self):
        """The backbone with any LoRA or axis factors merged in (a merged copy; training continues on the
        adapters or factors)."""
        if self.cfg.axis_factors:
            return merged(self.model), self.heads
        if self.peft is None:
            return self.model, self.heads
        import copy

        return copy.deepcopy(self.peft).merge_and_unload(), self.heads

    def save(self, step: int) -> None:
        save_state(self.out / "state.safetensors", self.modules(), self.optimizer, step, self.cfg)
        model, heads = self.inference_modules()
        save_checkpoint(self.out / "model.safetensors", model, heads, dtype="float32",
                        meta={"preset": self.preset_name, "stage": self.cfg.stage, "step": step,
                              "families": self.cfg.families, "max_faces": self.cfg.max_faces,
                              "axis_aligned": self.cfg.axis_aligned, "axis_turns": self.cfg.axis_turns,
                              "axis_factors": self.cfg.axis_factors})

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss/accuracy (teacher forced), head agreement, and a few AR generations scored by CD."""
        from xspecmesh.decoding.engine import Engine, DecodeSettings
        from xspecmesh.model.checkpoint import Checkpoint
        from xspecmesh.geometry.metrics import evaluate as score

        model, heads = self.inference_modules()
        model.eval()
        n = self.model.cfg.encoder.num_points
        if not hasattr(self, "_val"):
            self._val = validation_pairs(self.cfg.val_count, config=shape_config(self.cfg), num_points=n)
        totals: dict[str, float] = {}
        for i in range(0, len(self._val), 8):
            inputs, targets, points = (t.to(self.device) for t in collate(self._val[i : i + 8]))
            cond = model.encode(points)
            logits, hidden = model(inputs, cond=cond, taps=self.taps)
            valid = targets >= 0
            totals["loss"] = totals.get("loss", 0) + F.cross_entropy(
                logits[valid].float(), targets[valid], reduction="sum").item()
            totals["acc"] = totals.get("acc", 0) + (logits.argmax(-1) == targets)[valid].sum().item()
            totals["count"] = totals.get("count", 0) + valid.sum().item()
            if heads is not None:
                out = draft_outputs(heads, model, hidden, inputs, cond)
                _, agree = head_distillation_loss(out, logits, targets, 1.0, 0.0, heads.factored)
                for k, a in enumerate(agree):
                    totals[f"agree{k + 1}"] = totals.get(f"agree{k + 1}", 0) + a * len(inputs)
        count = totals.pop("count")
        result = {"loss": totals.pop("loss") / count, "acc": totals.pop("acc") / count}
        result |= {k: v / len(self._val) for k, v in totals.items()}
        if self.cfg.gen_count:
            engine = Engine(Checkpoint(model, heads, "training"), self.device)
            cds, ok = [], 0
            for pair in self._val[: self.cfg.gen_count]:
                res = engine.generate(pair.points, DecodeSettings(mode="ar", max_tokens=len(pair.tokens) * 2 + 50,
                                                                  fit=False))  # the model's own output
                if len(res.triangles):
                    ok += 1
                    cds.append(score(_mesh(res.triangles), _mesh(tok.dequantize(tok.decode(pair.tokens))))["cd"])
            result["gen_ok"] = ok / self.cfg.gen_count
            result["gen_cd"] = float(np.median(cds)) if cds else float("nan")
        self.model.train(self.cfg.stage != "heads")
        return result


def _mesh(triangles: np.ndarray):
    import trimesh

    return trimesh.Trimesh(triangles.reshape(-1, 3), np.arange(len(triangles) * 3).reshape(-1, 3), process=True)
