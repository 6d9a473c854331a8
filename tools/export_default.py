#!/usr/bin/env python3
"""Export a trained checkpoint as the shipped default (fp16, provenance in its metadata).

    python tools/export_default.py runs/lora/model.safetensors [backend/xspecmesh/weights/default.safetensors]
"""
from __future__ import annotations

import sys
from pathlib import Path

from xspecmesh.model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint, save_checkpoint


def main(src: str, dst: str | None = None) -> None:
    ck = load_checkpoint(src)
    meta = dict(ck.meta, preset=ck.meta.get("preset") or "small", source=Path(src).parent.name)
    out = save_checkpoint(dst or DEFAULT_CHECKPOINT, ck.model, ck.heads, dtype="float16", meta=meta)
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB, {ck.max_heads} heads, meta {meta}")


if __name__ == "__main__":
    main(*sys.argv[1:])
