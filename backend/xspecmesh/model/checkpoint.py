"""Checkpoints: one safetensors file holding the backbone (`model.*`), the drafting heads (`heads.*`) and, in its
metadata, both configs as JSON plus free-form provenance. Loading checks every name and shape and says exactly
what does not match. Nothing is ever unpickled here (see `convert_bpt` for the published pickled checkpoint)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from xspecmesh.model.config import HeadsConfig, ModelConfig, preset
from xspecmesh.errors import CheckpointError
from xspecmesh.model.drafter import Drafter, build_drafter
from xspecmesh.model.transformer import MeshTransformer

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "weights" / "default.safetensors"
FORMAT = "xspecmesh/1"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Checkpoint:
    model: MeshTransformer
    heads: Drafter | None  # the paper's heads or a draft decoder: its kind is in heads_config
    path: str
    meta: dict = field(default_factory=dict)

    @property
    def max_heads(self) -> int:
        return self.heads.num_heads if self.heads is not None else 0


def save_checkpoint(path, model: MeshTransformer, heads: Drafter | None = None, dtype: str = "float16",
                    meta: dict | None = None) -> Path:
    """Write model (+ heads) in `dtype` (floating tensors only) with the configs embedded."""
    cast = DTYPES[dtype]
    tensors = {}
    for prefix, module in (("model.", model), ("heads.", heads)):
        if module is None:
            continue
        for name, t in module.state_dict().items():
            t = t.detach().to("cpu")
            tensors[prefix + name] = (t.to(cast) if t.is_floating_point() else t).contiguous()
    metadata = {"format": FORMAT, "model_config": model.cfg.to_json(), "dtype": dtype,
                "meta": json.dumps(meta or {}, sort_keys=True)}
    if heads is not None:
        metadata["heads_config"] = heads.cfg.to_json()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)  # never leave a half-written checkpoint behind
    return path


def shape_problems(expected: dict[str, tuple], found: dict[str, tuple], limit: int = 8) -> list[str]:
    """Human-readable differences between two name -> shape maps (empty when they match)."""
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:limit])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:limit])})")
    for k in wrong[:limit]:
        problems.append(f"{k}: expected shape {list(expected[k])}, found {list(found[k])}")
    return problems


def load_checkpoint(path=None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Load a checkpoint written by `save_checkpoint`; `path=None` is the shipped default."""
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    if not path.is_file():
        if path == DEFAULT_CHECKPOINT:
            raise CheckpointError(f"no default checkpoint is installed ({path}); pass --checkpoint PATH")
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"cannot read checkpoint {path}: not a valid safetensors file ({exc})") from None
    if metadata.get("format") != FORMAT or "model_config" not in metadata:
        raise CheckpointError(f"{path} is not an xspecmesh checkpoint (no embedded config)")
    try:
        model_cfg = ModelConfig.from_json(metadata["model_config"])
        heads_cfg = HeadsConfig.from_json(metadata["heads_config"]) if "heads_config" in metadata else None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable embedded config ({exc})") from None
    model = MeshTransformer(model_cfg)
    try:
        heads = build_drafter(model_cfg, heads_cfg) if heads_cfg is not None else None
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    modules = {"model.": model, "heads.": heads}
    expected = {p + k: tuple(v.shape) for p, m in modules.items() if m is not None for k, v in m.state_dict().items()}
    problems = shape_problems(expected, {k: tuple(v.shape) for k, v in tensors.items()})
    if problems:
        raise CheckpointError(f"{path} does not match its config: " + "; ".join(problems))
    for prefix, module in modules.items():
        if module is None:
            continue
        sd = {k[len(prefix):]: v.to(dtype) if v.is_floating_point() else v
              for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(sd)
    model.to(device).eval()
    if heads is not None:
        heads.to(device).eval()
    return Checkpoint(model, heads, str(path), json.loads(metadata.get("meta", "{}")))


def write_random_checkpoint(path, preset_name: str = "tiny", heads: int = 4, seed: int = 0,
                            head_kind: str = "cross", dtype: str = "float32") -> Path:
    """A randomly initialised model (+ heads) saved as a checkpoint: for tests and timing."""
    torch.manual_seed(seed)
    cfg = preset(preset_name)
    model = MeshTransformer(cfg)
    draft = build_drafter(cfg, HeadsConfig(num_heads=heads, kind=head_kind)) if heads else None
    return save_checkpoint(path, model, draft, dtype=dtype, meta={"preset": preset_name, "random": True, "seed": seed})
