#!/usr/bin/env python3
"""Loss curves of training runs (their log.jsonl files) as one PNG: python tools/plot_training.py OUT.png RUN_DIR...

Backbone runs: training and validation loss. Head runs (stage 1 and stage 2): the heads' distillation loss, and each
head's top-1 agreement with the backbone (a moving average of the training logs, validation as dots)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SMOOTH = 10  # log rows in the moving average of the noisy per-batch agreement


def read(run: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def smooth(values: list[float]) -> np.ndarray:
    k = min(SMOOTH, len(values))
    return np.convolve(values, np.ones(k) / k, mode="valid") if k else np.array([])


def main(out: str, runs: list[str]) -> None:
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.8), squeeze=False)
    for ax, run in zip(axes[0], runs):
        train, val = read(Path(run))
        steps = [r["step"] for r in train]
        heads = "distill" in (train[-1] if train else {})
        if heads:
            ax.plot(steps, [r["distill"] for r in train], lw=0.8, alpha=0.7, label="distillation loss (train)")
        else:
            ax.plot(steps, [r["loss"] for r in train], lw=0.8, alpha=0.7, label="train loss")
            if val:
                ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
        agree = sorted(k for k in (train[-1] if train else {}) if k.startswith("agree"))
        if agree:
            twin = ax.twinx()
            for i, k in enumerate(agree):
                colour = f"C{i + 1}"
                y = smooth([r[k] for r in train])
                twin.plot(steps[len(steps) - len(y):], y, lw=1, color=colour, label=f"head {k[5:]}")
                vk = [(r["step"], r[f"val_{k}"]) for r in val if f"val_{k}" in r]
                if vk:
                    twin.plot(*zip(*vk), "o", color=colour, ms=5)
            twin.set_ylabel("head top-1 agreement (dots: validation)")
            twin.set_ylim(0, 1)
            twin.legend(loc="upper right", fontsize=7)
        ax.set_title(Path(run).name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats)")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
