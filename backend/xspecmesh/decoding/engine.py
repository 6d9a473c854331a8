"""The engine the CLI, the server and the benchmarks share: a loaded checkpoint, typed decode settings, and the
retopology pipeline's one entry point, `Engine.retopologize`: resample the points, decode, detokenize, fit (when the
settings ask for it) and keep the stats. `Engine.generate` collects it into one result."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from xspecmesh import __version__
from xspecmesh.geometry import tokenizer as tok
from xspecmesh.model import precision as precisions
from xspecmesh.model.checkpoint import Checkpoint, load_checkpoint
from xspecmesh.errors import MeshError, SettingsError
from xspecmesh.decoding.autoregressive import DecodeStats, decode_ar, decode_naive, token_limit
from xspecmesh.decoding.token_sampling import SamplingConfig
from xspecmesh.decoding.speculative import RULES, AcceptConfig, decode_speculative

MODES = ("ar", "spec", "naive")
MIN_CLOUD_POINTS = 16  # the least a cloud may have to be resampled to the encoder's size (the add-on sends far more:
# the protocol's MIN_POINTS)


@dataclass
class DecodeSettings:
    mode: str = "spec"  # "ar" (plain), "spec" (XSpecMesh), "naive" (the published-code-style AR loop)
    heads: int = 4  # D drafting heads (the first D of the checkpoint's)
    adaptive: bool = False  # choose each step's draft length in 0..heads from running estimates (ours)
    delta: float = 0.5  # threshold rule: accept while p(x) > delta
    accept: str = "threshold"  # threshold | exact | greedy | topk
    topk_accept: int = 5  # K of the topk rule
    temperature: float = 0.5
    top_k: int = 50
    top_p: float = 0.95
    max_tokens: int = 10000
    max_faces: int | None = None  # stop once this many faces are complete
    seed: int = 0
    precision: str = "auto"  # weights: auto (the engine's own: `--precision` of the command), fp32, int8, bf16
    fit: bool = False  # after decoding, move the vertices onto the input surface (Engine.retopologize)

    @classmethod
    def from_dict(cls, d: dict) -> "DecodeSettings":
        if not isinstance(d, dict):
            raise SettingsError("settings must be an object")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise SettingsError(f"unknown setting(s): {', '.join(unknown)}")
        out = cls()
        for k, v in d.items():
            default = getattr(out, k)
            if k == "max_faces" and v is None:
                pass
            elif isinstance(default, bool):
                if not isinstance(v, bool):
                    raise SettingsError(f"setting {k} must be true or false")
            elif isinstance(default, str) or k in ("mode", "accept"):
                if not isinstance(v, str):
                    raise SettingsError(f"setting {k} must be a string")
            elif isinstance(v, bool) or not isinstance(v, (int, float)):
                raise SettingsError(f"setting {k} must be a number")
            elif (isinstance(default, int) or k == "max_faces") and float(v) != int(v):
                raise SettingsError(f"setting {k} must be an integer")
            if v is not None and not isinstance(default, (bool, str)):
                v = int(v) if isinstance(default, int) or k == "max_faces" else float(v)
            setattr(out, k, v)
        out.validate()
        return out

    def validate(self, max_heads: int | None = None) -> "DecodeSettings":
        checks = [
            (self.mode in MODES, f"mode must be one of {', '.join(MODES)}"),
            (self.accept in RULES, f"accept must be one of {', '.join(RULES)}"),
            (1 <= self.heads <= 8, "heads must be between 1 and 8"),
            (0.0 <= self.delta <= 1.0, "delta must be between 0 and 1"),
            (1 <= self.topk_accept <= 1000, "topk_accept must be between 1 and 1000"),
            (0.0 <= self.temperature <= 10.0, "temperature must be between 0 and 10"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (1 <= self.max_tokens <= 100000, "max_tokens must be between 1 and 100000"),
            (self.max_faces is None or self.max_faces >= 1, "max_faces must be at least 1"),
            (0 <= self.seed < 2**63, "seed must be a non-negative integer"),
            (self.precision in precisions.PRECISIONS, f"precision must be one of {', '.join(precisions.PRECISIONS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingsError(message)
        if self.mode == "spec" and max_heads is not None and self.heads > max_heads:
            raise SettingsError(f"heads={self.heads} but the checkpoint has {max_heads} drafting head(s)")
        return self

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p)


@dataclass
class StepUpdate:
    tokens: list[int]  # accepted in this step
    triangles: np.ndarray  # (k, 3, 3) float32, completed in this step, normalized frame
    stats: dict  # cumulative
    done: bool = False  # the last update of the request
    decoded: bool = False  # decoding is over: every triangle has been yielded (a fit may follow)
    fitted: np.ndarray | None = None  # the last update of a fitted request: every triangle, in order, moved
    cancelled: bool = False  # a cancel came in during the fit, which is dropped


@dataclass
class GenerationResult:
    tokens: list[int]
    triangles: np.ndarray  # (T, 3, 3) float32, normalized frame, as decoded
    stats: dict = field(default_factory=dict)
    fitted: np.ndarray | None = None  # the same triangles moved onto the input surface, when the fit ran

    @property
    def mesh(self) -> np.ndarray:
        """The result's triangles: fitted when the fit ran, else as decoded."""
        return self.triangles if self.fitted is None else self.fitted


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise SettingsError(f"unknown device {device!r}; use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SettingsError("device cuda requested but no CUDA GPU is available")
    return torch.device(device)


def prepare_points(points, count: int, seed: int) -> np.ndarray:
    """Validate an (N, 6) cloud (xyz + normal, normalized frame) and resample it to `count` points."""
    pts = np.asarray(points, dtype=np.float32)
    if pts.ndim != 2 or pts.shape[1] != 6:
        raise MeshError(f"point cloud must have shape (N, 6) (xyz + normal), got {tuple(pts.shape)}")
    if len(pts) < MIN_CLOUD_POINTS:
        raise MeshError(f"point cloud has {len(pts)} points; at least {MIN_CLOUD_POINTS} are needed")
    if not np.isfinite(pts).all():
        raise MeshError("points contain NaN or infinite values")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(pts), count, replace=len(pts) < count)
    pts = pts[idx].copy()
    norms = np.linalg.norm(pts[:, 3:], axis=1, keepdims=True)
    pts[:, 3:] = np.where(norms > 1e-8, pts[:, 3:] / np.maximum(norms, 1e-8), 0.0)
    return pts


class Engine:
    """A loaded checkpoint on a device, at one weight precision. `retopologize` is the pipeline every caller goes
    through; `stream` is its decoding stage (what a test double replaces)."""

    def __init__(self, checkpoint: Checkpoint, device: torch.device, precision: str = "fp32"):
        self.ckpt, self.device, self.precision = checkpoint, device, precision
        self._siblings = {precision: self}  # the same checkpoint at other precisions, loaded on first use

    @classmethod
    def load(cls, checkpoint: str | None = None, device: str = "auto", precision: str = "auto") -> "Engine":
        dev = resolve_device(device)
        precisions.resolve(precision, dev)  # a bad combination fails before the load
        ckpt = load_checkpoint(checkpoint, device=dev)
        concrete = precisions.resolve(precision, dev, ckpt.meta)
        precisions.apply(ckpt.model, ckpt.heads, concrete)
        return cls(ckpt, dev, concrete)

    def at_precision(self, precision: str) -> "Engine":
        """This engine's checkpoint with `precision` weights ("auto": this engine's own). Another precision is
        loaded from the checkpoint file on first use and then kept, so a server that gets requests with several
        precisions holds one model per precision."""
        concrete = self.precision if precision == "auto" else precisions.resolve(precision, self.device, self.ckpt.meta)
        if concrete not in self._siblings:
            sibling = Engine.load(self.ckpt.path, str(self.device), concrete)
            sibling._siblings = self._siblings
            self._siblings[concrete] = sibling
        return self._siblings[concrete]

    @property
    def model(self):
        return self.ckpt.model

    @property
    def max_heads(self) -> int:
        return self.ckpt.max_heads

    @property
    def info(self) -> dict:
        cfg = self.model.cfg
        return {"version": __version__, "torch": torch.__version__, "device": str(self.device),
                "checkpoint": self.ckpt.path, "precision": self.precision, "heads": self.max_heads,
                "preset": self.ckpt.meta.get("preset"), "num_points": cfg.encoder.num_points,
                "drafter": self.ckpt.heads.cfg.kind if self.ckpt.heads is not None else None}

    @torch.no_grad()
    def condition(self, points, seed: int = 0) -> torch.Tensor:
        pts = prepare_points(points, self.model.cfg.encoder.num_points, seed)
        return self.model.encode(torch.from_numpy(pts)[None].to(self.device, self.model.bos.dtype))

    def decoder(self, cond: torch.Tensor, settings: DecodeSettings, stats: DecodeStats):
        gen = torch.Generator(device=self.device).manual_seed(settings.seed)
        common = dict(sampling=settings.sampling(), max_tokens=settings.max_tokens, generator=gen, stats=stats)
        if settings.mode == "spec":
            if self.ckpt.heads is None:
                raise SettingsError("this checkpoint has no drafting heads; use mode ar")
            accept = AcceptConfig(settings.accept, settings.delta, settings.topk_accept)
            return decode_speculative(self.model, self.ckpt.heads, cond, accept=accept, num_heads=settings.heads,
                                      adaptive=settings.adaptive, **common)
        if settings.mode == "naive":
            return decode_naive(self.model, cond, **common)
        return decode_ar(self.model, cond, **common)

    def stream(self, points, settings: DecodeSettings) -> Iterator[StepUpdate]:
        """The decoding stage: one update per decoding step, the last one `done`; stop iterating to cancel."""
        settings.validate(self.max_heads)
        engine = self.at_precision(settings.precision)
        if engine is not self:
            yield from engine.stream(points, settings)
            return
        start = time.perf_counter()
        cond = self.condition(points, settings.seed)
        stats = DecodeStats()
        detok = tok.IncrementalDetokenizer()
        faces = 0
        summary: dict = {}
        for accepted in self.decoder(cond, settings, stats):
            tris = [detok.push(t) for t in accepted[0]]
            tris = np.concatenate(tris) if tris else np.zeros((0, 3, 3), dtype=np.int64)
            if settings.max_faces is not None:
                tris = tris[: max(0, settings.max_faces - faces)]
            faces += len(tris)
            full = settings.max_faces is not None and faces >= settings.max_faces
            summary = stats.as_dict() | {"faces": faces, "seconds": round(time.perf_counter() - start, 4),
                                         "decode_seconds": round(stats.seconds, 4), "mode": settings.mode,
                                         "heads": settings.heads if settings.mode == "spec" else 0,
                                         "adaptive": settings.adaptive and settings.mode == "spec",
                                         "delta": settings.delta, "accept": settings.accept,
                                         "device": str(self.device), "precision": self.precision}
            if full:
                summary["complete"] = False  # cut at max_faces
            yield StepUpdate(accepted[0], tok.dequantize(tris).astype(np.float32), summary, done=full)
            if full:
                return
        # The decoder ended: at EOS (a whole mesh) or at the token limit (a cut one).
        summary = summary | {"complete": stats.tokens < token_limit(self.model, settings.max_tokens)}
        yield StepUpdate([], np.zeros((0, 3, 3), dtype=np.float32), summary, done=True)

    def retopologize(self, points, settings: DecodeSettings,
                     cancelled: Callable[[], bool] = lambda: False) -> Iterator[StepUpdate]:
        """The retopology pipeline, the one entry point of serve, generate and bench.

        `points`: (N, 6) xyz + normal in the normalized frame (resampled to the encoder's size for decoding; the fit
        uses them all). Yields one update per decoding step, as `stream`; the last decoding update has `decoded` set,
        so a caller can send every face before the fit starts. When `settings.fit` asks for it and triangles came
        out, one more update follows with the fit's stats and `fitted` (None when the fit was skipped or failed:
        `fit_skipped` / `fit_error` in the stats say why). The fit cannot be interrupted: `cancelled` is asked once it
        is over, and a cancel that came in meanwhile drops it (the update says `cancelled`). Stop iterating to
        cancel the decoding.
        """
        parts = []
        for upd in self.stream(points, settings):
            parts.append(upd.triangles)
            upd.decoded = upd.done
            fit = upd.done and settings.fit and sum(map(len, parts)) > 0
            upd.done = upd.done and not fit
            yield upd
            if fit:
                yield _fit(np.concatenate(parts), points, upd.stats, cancelled)

    def generate(self, points, settings: DecodeSettings) -> GenerationResult:
        """`retopologize` run to the end, collected."""
        tokens, tris, stats, fitted = [], [], {}, None
        for upd in self.retopologize(points, settings):
            tokens.extend(upd.tokens)
            tris.append(upd.triangles)
            stats, fitted = upd.stats, upd.fitted
        return GenerationResult(tokens, np.concatenate(tris) if tris else np.zeros((0, 3, 3), np.float32), stats,
                                fitted)


def _fit(triangles: np.ndarray, points, stats: dict, cancelled: Callable[[], bool]) -> StepUpdate:
    from xspecmesh.geometry.fit import fit_result  # scipy's sparse solvers: loaded only when a fit is asked for

    fitted, fit_stats = fit_result(triangles, points, stats)
    stats = stats | fit_stats
    if cancelled():
        stats = {k: v for k, v in stats.items() if not k.startswith("fit_")} | {"fit_skipped": "cancelled"}
        return StepUpdate([], np.zeros((0, 3, 3), np.float32), stats, done=True, decoded=True, cancelled=True)
    return StepUpdate([], np.zeros((0, 3, 3), np.float32), stats, done=True, decoded=True, fitted=fitted)
