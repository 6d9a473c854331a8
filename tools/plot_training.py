#!/usr/bin/env python3
"""Loss curves of training runs (their log.jsonl files) as one PNG: python tools/plot_training.py OUT.png RUN_DIR..."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(run: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def main(out: str, runs: list[str]) -> None:
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
    for ax, run in zip(axes[0], runs):
        train, val = read(Path(run))
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.7, label="train loss")
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
        agree = sorted(k for k in (train[-1] if train else {}) if k.startswith("agree"))
        if agree:
            twin = ax.twinx()
            for k in agree:
                twin.plot([r["step"] for r in train], [r[k] for r in train], lw=0.6, label=f"head {k[5:]} top-1")
            twin.set_ylabel("head top-1 agreement with the backbone")
            twin.set_ylim(0, 1)
            twin.legend(loc="upper right", fontsize=7)
        ax.set_title(Path(run).name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats)")
        ax.legend(loc="lower left", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
