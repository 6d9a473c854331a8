"""The backbone's own samples decoded once and kept in a file, for `train heads --sample-file`.

A drafter learns best from the sequences it will have to guess: the backbone's own samples at the add-on's sampling
settings (`trainer.own_sequences`). Decoded inside training they cost a CPU more than the training step itself (an AR
decode for every micro-batch they replace; docs/TRAINING.md), so `xspecmesh dataset samples` decodes them once, in
large batches, and training reads them: the backbone is frozen while a drafter trains, so samples decoded ahead are
samples of the same distribution, and one file serves every leg on that backbone.

The file (safetensors, no pickle) holds only tokens. The shapes they were decoded for are the first `count` pairs of
the training stream of its seed (`data.iter_pairs`), drawn again when it is read (milliseconds a shape) and checked
against a checksum of their true tokens; the backbone that decoded them is named by a fingerprint of its weights,
checked against the one training distils. A million sampled tokens take a few MB. Decoding a pool takes a CPU an
hour or more, so it is kept batch by batch as it goes (`write`, `dataset samples --resume`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from xspecmesh.errors import SettingsError
from xspecmesh.training.data import ShapeConfig, TrainingPair, iter_pairs

FORMAT = "xspecmesh-own-samples/1"


def backbone_fingerprint(model) -> str:
    """Names a backbone's weights, the same for its fp32 and fp16 copies (a shipped checkpoint is an fp16 export of
    the fp32 one training distils): a hash of the output projection and token embedding rounded to fp16."""
    h = hashlib.sha256()
    for w in (model.to_logits.weight, model.to_logits.bias, model.token_embed.weight):
        h.update(w.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _checksum(tokens: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(tokens, dtype=np.int64).tobytes())


def _shapes(seed: int, shapes: ShapeConfig, num_points: int, count: int) -> Iterator[TrainingPair]:
    return itertools.islice(iter_pairs(seed, shapes, num_points=num_points, augment=True), count)


def partial_path(path: str | Path) -> Path:
    """Where `write` keeps the samples decoded so far, until the file is complete."""
    return Path(f"{path}.partial")


def _save(path: Path, tokens: list, lengths: list, ended: list, checks: list, meta: dict, **extra) -> None:
    """Write atomically (a temporary file, then a rename): a run cut meanwhile leaves the last whole file."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({"tokens": torch.from_numpy(np.concatenate(tokens).astype(np.int16)),
               "lengths": torch.tensor(lengths, dtype=torch.int32), "ended": torch.tensor(ended, dtype=torch.bool),
               "checksums": torch.tensor(checks, dtype=torch.int64), **extra}, str(tmp),
              metadata={k: str(v) for k, v in meta.items()})
    os.replace(tmp, path)


def _resume(partial: Path, meta: dict) -> tuple[list, list, list, list, torch.Tensor]:
    """The samples and generator state a cut run of the same settings left in `partial`."""
    with safe_open(str(partial), framework="pt") as f:
        theirs, data = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    differ = [k for k, v in meta.items() if theirs.get(k) != str(v)]
    if differ:
        raise SettingsError(f"{partial} was decoded with other settings ({', '.join(differ)}): delete it, or run "
                            f"without --resume to start over")
    lengths = data["lengths"].tolist()
    tokens = np.split(data["tokens"].numpy().astype(np.int64), np.cumsum(lengths)[:-1])
    return tokens, lengths, data["ended"].tolist(), data["checksums"].tolist(), data["generator"]


@torch.no_grad()
def write(path: str | Path, model, shapes: ShapeConfig, count: int, seed: int, max_tokens: int, batch: int = 32,
          progress: Callable[[int], None] | None = None, resume: bool = False) -> dict:
    """Decode the backbone's own samples for the first `count` shapes of the training stream of `seed` (`batch` at
    a time, up to `max_tokens` tokens each) and write them to `path`. Returns the file's summary.

    After every batch the samples so far and the generator's state are kept in `partial_path(path)`; with `resume`
    a run that was cut goes on from there (the same file as one uninterrupted run: the same settings are required),
    without it a run starts over. The partial file is removed once `path` is written."""
    from xspecmesh.training.trainer import own_sequences

    if count < 1 or batch < 1:
        raise SettingsError("the sample count and the batch must be at least 1")
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    meta = {"format": FORMAT, "backbone": backbone_fingerprint(model), "seed": seed, "count": count,
            "max_tokens": max_tokens, "num_points": model.cfg.encoder.num_points,
            "shapes": json.dumps(dataclasses.asdict(shapes)), "batch": batch}
    path, partial = Path(path), partial_path(path)
    tokens, lengths, ended, checks = [], [], [], []
    if resume and partial.exists():
        tokens, lengths, ended, checks, state = _resume(partial, meta)
        generator.set_state(state)
    stream = _shapes(seed, shapes, model.cfg.encoder.num_points, count)
    for _ in range(len(lengths)):  # (the shapes already decoded: milliseconds each to draw again)
        next(stream)
    if progress and lengths:
        progress(len(lengths))
    for start in range(len(lengths), count, batch):
        pairs = [next(stream) for _ in range(min(batch, count - start))]
        points = torch.from_numpy(np.stack([p.points for p in pairs])).to(device)
        for pair, sample in zip(pairs, own_sequences(model, model.encode(points), max_tokens, generator)):
            tokens.append(sample.tokens)
            lengths.append(len(sample.tokens))
            ended.append(sample.ended)
            checks.append(_checksum(pair.tokens))
        _save(partial, tokens, lengths, ended, checks, meta, generator=generator.get_state())
        if progress:
            progress(len(pairs))
    _save(path, tokens, lengths, ended, checks, meta)
    partial.unlink()
    return {**meta, "tokens": int(sum(lengths)), "ended": int(sum(ended))}


def read(path: str | Path, model) -> list[TrainingPair]:
    """The file's samples, each with the points of the shape it was decoded for. Refuses a file decoded by another
    backbone than `model`, or whose shapes the training stream no longer draws (the shape code changed)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, data = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as exc:  # missing, or not a safetensors file
        raise SettingsError(f"cannot read the sample file {path}: {exc}") from None
    if meta.get("format") != FORMAT:
        raise SettingsError(f"{path} is not a sample file of `xspecmesh dataset samples` ({FORMAT})")
    ours = backbone_fingerprint(model)
    if meta["backbone"] != ours:
        raise SettingsError(f"{path} holds samples of another backbone (fingerprint {meta['backbone']}, this one's "
                            f"{ours}): decode them again with `xspecmesh dataset samples`")
    if int(meta["num_points"]) != model.cfg.encoder.num_points:
        raise SettingsError(f"{path} was made for {meta['num_points']} points a shape, this backbone reads "
                            f"{model.cfg.encoder.num_points}")
    s = json.loads(meta["shapes"])
    shapes = ShapeConfig(**{**s, "families": tuple(s["families"]) if s["families"] else None})
    lengths, checks, ended = (data[k].tolist() for k in ("lengths", "checksums", "ended"))
    tokens = np.split(data["tokens"].numpy().astype(np.int64), np.cumsum(lengths)[:-1])
    out = []
    for i, pair in enumerate(_shapes(int(meta["seed"]), shapes, model.cfg.encoder.num_points, int(meta["count"]))):
        if _checksum(pair.tokens) != checks[i]:
            raise SettingsError(f"{path}: shape {i} of its stream is no longer the one it was decoded for (the shape "
                                f"code changed); decode the samples again with `xspecmesh dataset samples`")
        out.append(TrainingPair(tokens[i], pair.points, "sample", ended=ended[i]))
    return out


def endless(samples: list[TrainingPair], seed: int) -> Iterator[TrainingPair]:
    """The samples over and over, each pass in a new random order."""
    rng = np.random.default_rng(seed)
    while True:
        for i in rng.permutation(len(samples)):
            yield samples[i]
