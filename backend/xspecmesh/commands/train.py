"""`xspecmesh train {backbone,heads,lora}`: every TrainConfig field is an option of the same name."""
from __future__ import annotations

import dataclasses

STAGE_DEFAULTS = {
    "backbone": {"out": "runs/backbone"},
    "heads": {"out": "runs/heads", "lr": 1e-3, "steps": 3000, "warmup": 100},
    "lora": {"out": "runs/lora", "lr": 2e-4, "steps": 1000, "warmup": 50},
}


def register(sub) -> None:
    from xspecmesh.training.config import TrainConfig  # dataclasses only: --help stays fast

    p = sub.add_parser("train", help="train the backbone, then the heads (stage 1), then LoRA + heads (stage 2)")
    p.add_argument("stage", choices=sorted(STAGE_DEFAULTS))
    for f in dataclasses.fields(TrainConfig):
        if f.name == "stage":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", help=f"(default {f.default})")
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            p.add_argument(flag, type=kind, default=None, help=f"(default {f.default})")
    p.set_defaults(func=run)


def run(args) -> int:
    from xspecmesh.training.config import TrainConfig
    from xspecmesh.training.trainer import Trainer

    values = dict(STAGE_DEFAULTS[args.stage])
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if f.name != "stage" and v is not None and v is not False:
            values[f.name] = v
    cfg = TrainConfig(stage=args.stage, **values)
    last = Trainer(cfg).run()
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in last.items()))
    return 0
