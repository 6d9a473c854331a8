"""Does a lower weight precision change what the model predicts? Teacher-forced on validation shapes (their own
token sequences), the fp32 backbone and the one at another precision (int8, bf16) read the same inputs; we count
the positions where their most likely next token agrees, and do the same for every drafting head. Run by
`xspecmesh bench --precision-check --precision int8`. Acceptance and CD are end-to-end numbers: `xspecmesh bench
--compare-precision`.
"""
from __future__ import annotations

import torch

from xspecmesh.benchmarks.bench import json_safe, machine_info
from xspecmesh.decoding.engine import Engine
from xspecmesh.model.drafter import draft_logits


def validation_pairs_for(engine: Engine, args) -> list:
    """`--count` held-out shapes of the distribution the checkpoint was trained on (as `bench` uses)."""
    from xspecmesh.training.data import ShapeConfig, validation_pairs

    return validation_pairs(args.count, config=ShapeConfig.trained_on(engine.ckpt.meta, args.families, args.max_faces),
                            num_points=engine.model.cfg.encoder.num_points)


@torch.inference_mode()
def predictions(engine: Engine, inputs: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher-forced top-1 tokens of the backbone (B, T) and of the heads (B, T, D) (None without heads)."""
    model, heads = engine.model, engine.ckpt.heads
    cond = model.encode(points.to(engine.device, model.bos.dtype))
    inputs = inputs.to(engine.device)
    logits, hidden = model(inputs, cond=cond, taps=heads.taps if heads is not None else ())
    drafts = None if heads is None else draft_logits(heads, model, hidden, inputs, cond).argmax(-1).cpu()
    return logits.argmax(-1).cpu(), drafts


def agreement(reference: Engine, other: Engine, pairs: list, batch: int = 8) -> dict:
    """Top-1 agreement of `other` with `reference` over every target position of `pairs` (backbone, per head),
    and each one's teacher-forced accuracy against the true next token."""
    from xspecmesh.training.trainer import collate

    same = total = ref_hits = other_hits = 0
    head_same = None
    for i in range(0, len(pairs), batch):
        inputs, targets, points = collate(pairs[i : i + batch])
        valid = targets >= 0
        ref, ref_heads = predictions(reference, inputs, points)
        got, got_heads = predictions(other, inputs, points)
        same += int((ref == got)[valid].sum())
        ref_hits += int((ref == targets)[valid].sum())
        other_hits += int((got == targets)[valid].sum())
        total += int(valid.sum())
        if ref_heads is not None and got_heads is not None:
            per_head = (ref_heads == got_heads)[valid].sum(0)
            head_same = per_head if head_same is None else head_same + per_head
    return json_safe({**machine_info(other), "checkpoint": other.ckpt.path, "reference": reference.precision,
                      "precision": other.precision, "shapes": len(pairs), "positions": total,
                      "agreement": same / max(total, 1), "accuracy_reference": ref_hits / max(total, 1),
                      "accuracy": other_hits / max(total, 1),
                      "head_agreement": None if head_same is None else (head_same.double() / max(total, 1)).tolist()})


def markdown(result: dict) -> str:
    heads = result["head_agreement"]
    return "\n".join([
        f"checkpoint {result['checkpoint']}: {result['precision']} against {result['reference']}, teacher-forced on "
        f"{result['shapes']} validation shapes ({result['positions']} positions)", "",
        "| backbone top-1 agreement | next-token accuracy, " + result["reference"] + " | next-token accuracy, "
        + result["precision"] + " | head top-1 agreement (heads 1..D) |",
        "|---|---|---|---|",
        f"| {result['agreement']:.4f} | {result['accuracy_reference']:.4f} | {result['accuracy']:.4f} | "
        + ("–" if heads is None else " / ".join(f"{a:.3f}" for a in heads)) + " |"])
