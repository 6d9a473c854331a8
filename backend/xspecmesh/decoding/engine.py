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
from xspecmesh.geometry.metrics import closed, distance_to_points
from xspecmesh.model import precision as precisions
from xspecmesh.model.checkpoint import Checkpoint, load_checkpoint
from xspecmesh.errors import MeshError, SettingsError
from xspecmesh.decoding import fit_worker, settings_schema
from xspecmesh.decoding.adaptive import DraftLength
from xspecmesh.decoding.autoregressive import DecodeStats, decode_ar, decode_naive, token_limit
from xspecmesh.decoding.token_sampling import SamplingConfig
from xspecmesh.decoding.speculative import AcceptConfig, decode_speculative

JOINING = ("ar", "spec")  # modes whose decoders batch continuously (`join`); the naive loop goes in rounds
# A decode that completes no face in this many tokens is stuck in one of the backbone's loops (one vertex or face
# over and over, which detokenizes to nothing), which tends to last to the token limit: it is stopped there with the
# faces made so far (docs/ARCHITECTURE.md, "Stalled decodes": on the backbone's own samples this gives up 0.03% of the
# faces of those that end at EOS).
STALL_TOKENS = 128
MIN_CLOUD_POINTS = 16  # the least a cloud may have to be resampled to the encoder's size (the add-on sends far more:
# the protocol's MIN_POINTS)


_DEFAULTS = settings_schema.defaults()


@dataclass
class DecodeSettings:
    """One request's decode settings; names, defaults, ranges and help are declared in `settings_schema`."""

    mode: str = _DEFAULTS["mode"]  # "ar" (plain), "spec" (XSpecMesh), "naive" (the published-code-style AR loop)
    heads: int = _DEFAULTS["heads"]  # D drafting heads (the first D of the checkpoint's)
    adaptive: bool = _DEFAULTS["adaptive"]  # choose each step's draft length in 0..heads from running estimates (ours)
    tree: bool = _DEFAULTS["tree"]  # also verify the drafter's runner-up for the first draft (ours)
    confidence: float = _DEFAULTS["confidence"]  # end a step's drafts after one the drafter doubts this much (ours)
    delta: float = _DEFAULTS["delta"]  # threshold rule: accept while p(x) > delta
    accept: str = _DEFAULTS["accept"]  # threshold | exact | greedy | topk
    topk_accept: int = _DEFAULTS["topk_accept"]  # K of the topk rule
    temperature: float = _DEFAULTS["temperature"]
    top_k: int = _DEFAULTS["top_k"]
    top_p: float = _DEFAULTS["top_p"]
    max_tokens: int = _DEFAULTS["max_tokens"]
    max_faces: int | None = _DEFAULTS["max_faces"]  # stop once this many faces are complete (None: no limit)
    seed: int = _DEFAULTS["seed"]
    candidates: int = _DEFAULTS["candidates"]  # decode this many samples (seeds seed, seed + 1, ...), keep the best
    precision: str = _DEFAULTS["precision"]  # weights: auto (the engine's own: `--precision` of the command), fp32, ...
    fit: bool = _DEFAULTS["fit"]  # after decoding, move the vertices onto the input surface (Engine.retopologize)

    @classmethod
    def from_dict(cls, d: dict, max_heads: int | None = None) -> "DecodeSettings":
        """A request's `settings` object: missing settings take their defaults, anything else is a SettingsError.
        In spec mode, more heads than the checkpoint's `max_heads` are lowered to it (settings_schema.cap_heads)."""
        try:
            out = cls(**settings_schema.check(d))
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        if out.mode == "spec" and max_heads:
            out.heads = settings_schema.cap_heads(out.heads, max_heads)
        return out

    def validate(self, max_heads: int | None = None) -> "DecodeSettings":
        """Refuses a value outside its range; in spec mode also more heads than the checkpoint has (callers lower
        `heads` with `settings_schema.cap_heads` first where that is what the user asked for)."""
        self.from_dict(dataclasses.asdict(self))
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
        self._draft_lengths: dict[tuple, DraftLength] = {}  # adaptive D's running estimates, kept across requests

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

    @torch.inference_mode()
    def condition(self, points, seed: int = 0) -> torch.Tensor:
        pts = prepare_points(points, self.model.cfg.encoder.num_points, seed)
        return self.model.encode(torch.from_numpy(pts)[None].to(self.device, self.model.bos.dtype))

    def decoder(self, cond: torch.Tensor, settings: DecodeSettings, stats: DecodeStats, generator=None,
                max_tokens: int | None = None, finished: torch.Tensor | None = None, join=None):
        """The decoder `settings` ask for over cond's batch; `generator` (one, or one per sequence), `max_tokens`,
        the caller-owned `finished` mask and `join` are for `stream_batch`."""
        gen = generator if generator is not None else torch.Generator(device=self.device).manual_seed(settings.seed)
        common = dict(sampling=settings.sampling(), max_tokens=max_tokens or settings.max_tokens, generator=gen,
                      stats=stats, finished=finished)
        if join is not None:  # (only passed when given: the naive loop has no continuous batching)
            common["join"] = join
        if settings.mode == "spec":
            if self.ckpt.heads is None:
                raise SettingsError("this checkpoint has no drafting heads; use mode ar")
            accept = AcceptConfig(settings.accept, settings.delta, settings.topk_accept)
            # Acceptance depends on the rule and the sampling, a step's cost on D and the batch: one chooser for each
            # batch size and each setting a batch must share.
            key = (cond.shape[0], batch_key(settings))
            adaptive = settings.adaptive and self._draft_lengths.setdefault(key, DraftLength(settings.heads))
            return decode_speculative(self.model, self.ckpt.heads, cond, accept=accept, num_heads=settings.heads,
                                      adaptive=adaptive, tree=settings.tree, confidence=settings.confidence,
                                      **common)
        if settings.mode == "naive":
            return decode_naive(self.model, cond, **common)
        return decode_ar(self.model, cond, **common)

    def _settings_stats(self, settings: DecodeSettings) -> dict:
        """The request's decode settings as every update's stats report them."""
        spec = settings.mode == "spec"
        return {"mode": settings.mode, "heads": settings.heads if spec else 0, "adaptive": settings.adaptive and spec,
                "delta": settings.delta, "accept": settings.accept, "device": str(self.device),
                "precision": self.precision}

    def stream(self, points, settings: DecodeSettings) -> Iterator[StepUpdate]:
        """The decoding stage: one update per decoding step, the last one `done`; stop iterating to cancel."""
        settings.validate(self.max_heads)
        engine = self.at_precision(settings.precision)
        if engine is not self:
            yield from engine.stream(points, settings)
            return
        if settings.candidates > 1:  # the batch path decodes them together and keeps one (the fit is the caller's)
            cond, plain = self.condition(points, settings.seed), dataclasses.replace(settings, fit=False)
            yield from (upd for _, upd in self.stream_batch([cond], [plain], points=[points]))
            return
        start = time.perf_counter()
        cond = self.condition(points, settings.seed)
        stats = DecodeStats()
        mesh = Decoded(settings.max_faces, token_limit(self.model, settings.max_tokens))
        summary: dict = {}
        fixed = self._settings_stats(settings)
        for accepted in self.decoder(cond, settings, stats):
            new, tris = mesh.add(accepted[0])
            summary = stats.as_dict() | {"faces": mesh.faces, "seconds": round(time.perf_counter() - start, 4),
                                         "decode_seconds": round(stats.seconds, 4)} | fixed
            if mesh.stopped:
                summary |= mesh.final()
            yield StepUpdate(new, tris, summary, done=mesh.stopped)
            if mesh.stopped:
                return
        # The decoder ended: at EOS (a whole mesh) or at the token limit (a cut one).
        summary = summary | mesh.final()
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
                yield _fit_update(fit_worker.fit_here(np.concatenate(parts), points, upd.stats), upd.stats, cancelled)

    def generate(self, points, settings: DecodeSettings) -> GenerationResult:
        """`retopologize` run to the end, collected."""
        tokens, tris, stats, fitted = [], [], {}, None
        for upd in self.retopologize(points, settings):
            tokens.extend(upd.tokens)
            tris.append(upd.triangles)
            stats, fitted = upd.stats, upd.fitted
        return GenerationResult(tokens, np.concatenate(tris) if tris else np.zeros((0, 3, 3), np.float32), stats,
                                fitted)

    # ---------------------------------------------------------------------------------------------- batches
    def stream_batch(self, conds: list[torch.Tensor], settings: list[DecodeSettings], stop: set[int] | None = None,
                     slots: int | None = None, points: list | None = None,
                     cancelled: Callable[[int], bool] = lambda i: False) -> Iterator[tuple[int, StepUpdate]]:
        """Decode several objects together: conds[i] from `condition(points_i, settings[i].seed)`, and settings
        that agree but for `batch_key`'s exceptions (seed, max_tokens, max_faces, fit).

        At most `slots` objects (default: all) decode at once. AR and speculative decoding batch continuously: when
        one finishes, the next waiting object takes its slot (with a fresh cache row, drafter state, grammar state and
        generator), and once none waits, finished ones leave the batch. The naive loop goes in rounds of `slots`
        objects (it is a baseline, with no joining).
        Yields (i, update) for every running object after each step: each object's updates are those `stream`
        gives for it alone (the last one has done=True), and it stops at its own EOS, max_faces or max_tokens.
        Each object has its own random stream (seeded by its seed), so greedy decoding gives the tokens of decoding
        it alone (up to floating-point rounding), and sampling is reproducible for given seeds, slots and order.
        Adding i to `stop` between steps drops object i silently (a cancel); one that has not started yet takes no
        slot. A step costs one batched forward over the live rows.

        With `points` (each object's cloud, as for `retopologize`), an object whose settings ask for the fit gets it
        as `retopologize` does: its last decoding update has `decoded` set and not `done`, and one more update with
        the fit follows (`cancelled(i)` is asked once the fit is over)."""
        if len({batch_key(s) for s in settings}) > 1:
            raise SettingsError("the objects of one batch must share their decode settings (all but seed and limits)")
        for s in settings:
            s.validate(self.max_heads)
        engine = self.at_precision(settings[0].precision)  # (batch_key: one precision for the whole batch)
        if engine is not self:
            yield from engine.stream_batch(conds, settings, stop, slots, points, cancelled)
            return
        if settings[0].candidates > 1:
            yield from self._best_of(conds, settings, stop, slots, points, cancelled)
            return
        n = len(conds)
        slots = min(slots or n, n)
        stop = stop if stop is not None else set()
        start = time.perf_counter()
        gens = [torch.Generator(device=self.device).manual_seed(s.seed) for s in settings]
        rows = [_Row(s, token_limit(self.model, s.max_tokens), start) for s in settings]
        common = self._settings_stats(settings[0]) | {"batch": slots}
        # AR and spec join and leave (one decoder for all); the naive loop decodes in rounds of `slots`. An object
        # in `stop` takes no slot: rounds are made from the objects still wanted as each round starts.
        joins = settings[0].mode in JOINING
        left = list(range(n))
        while left:
            left = [i for i in left if i not in stop]
            group, left = (left, []) if joins else (left[:slots], left[slots:])
            if group:
                yield from self._stream_group(conds, settings, rows, gens, group, slots, joins, stop, points,
                                              cancelled, common)

    def _stream_group(self, conds, settings, rows, gens, group, slots, joins, stop, points, cancelled, common):
        """`stream_batch` over the objects `group`: `slots` at a time, the others joining as slots free up."""
        stats = DecodeStats()
        holder = group[:slots]  # the object in each slot
        waiting = (i for i in group[slots:] if i not in stop)  # asked as slots free up: a cancel while waiting counts
        finished = torch.zeros(len(holder), dtype=torch.bool, device=self.device)

        def join(free: list[int]) -> list:
            out = []
            for slot, i in zip(free, waiting):
                holder[slot] = i
                rows[i].started = time.perf_counter()
                # The speculative decoder prefills a joining object at once and streams that step's token with its
                # next step's: one update, two of the object's steps (as `stream` counts them).
                rows[i].steps += settings[i].mode == "spec"
                out.append((slot, conds[i], gens[i]))
            return out

        for i in holder:
            rows[i].started = time.perf_counter()
        fits: dict[int, fit_worker.Fit] = {}  # object -> its fit, running beside the batch

        def fitted(i: int, idle: bool = False) -> StepUpdate:
            running = fits.pop(i)
            return _fit_update(fit_worker.result(running, idle), running.stats, lambda: cancelled(i))

        steps = self.decoder(torch.cat([conds[i] for i in holder]), settings[0], stats, [gens[i] for i in holder],
                             max(settings[i].max_tokens for i in group), finished,
                             join if joins and len(group) > 1 else None)
        try:
            for accepted in steps:
                ended = finished.tolist()
                for slot, new in enumerate(accepted):
                    i = holder[slot]
                    row = rows[i]
                    if row.done or i in stop:
                        finished[slot] = True
                        row.done = True
                        continue
                    upd = row.push(new, ended[slot])
                    fit = upd.done and row.settings.fit and points is not None and row.faces > 0
                    upd.done = upd.done and not fit
                    if upd.decoded:
                        finished[slot] = True
                    seconds = time.perf_counter() - row.started
                    upd.stats = upd.stats | common | {
                        "seconds": round(seconds, 4), "tokens_per_second": round(len(row.tokens) / seconds, 2),
                        "batch_steps": stats.steps, "batch_tokens_per_second": stats.as_dict()["tokens_per_second"]}
                    yield i, upd
                    if fit and len(group) > 1:  # others are decoding: fit in the worker process, beside them
                        fits[i] = fit_worker.start(np.concatenate(row.parts), points[i], upd.stats)
                    elif fit:
                        result = fit_worker.fit_here(np.concatenate(row.parts), points[i], upd.stats)
                        yield i, _fit_update(result, upd.stats, lambda i=i: cancelled(i))
                for i in [i for i, f in fits.items() if f.done()]:
                    yield i, fitted(i)
            for i in list(fits):  # decoding is over: the fits the worker has not started yet run here
                yield i, fitted(i, idle=True)
        finally:
            steps.close()
            for f in fits.values():
                f.cancel()

    def _best_of(self, conds, settings, stop, slots, points, cancelled):
        """`stream_batch` with candidates = K > 1: every object decoded K times in one batch (K slots per object; the
        seeds from its seed on, each candidate as that seed alone decodes it), then one kept (`_candidate_rank`:
        closed, complete, nearest the object's points). Until then an object's updates carry progress only (no
        triangles); the kept candidate's triangles come in one update, its fit (when asked, run here) after it."""
        k, stop = settings[0].candidates, stop if stop is not None else set()
        subs = [dataclasses.replace(s, candidates=1, fit=False, seed=(s.seed + j) % 2**31)
                for s in settings for j in range(k)]
        inner_stop: set[int] = set()
        triangles: list[list[np.ndarray]] = [[] for _ in subs]
        tokens: list[list[int]] = [[] for _ in subs]
        last: list[dict] = [{} for _ in subs]
        left = [k] * len(conds)  # candidates of each object still decoding
        empty = np.zeros((0, 3, 3), dtype=np.float32)
        # Each candidate as its seed alone would decode it: its own sample of the points, where they are given (the
        # first candidate's seed is the object's, whose condition the caller made).
        sub_conds = [conds[r // k] if points is None or r % k == 0 else self.condition(points[r // k], sub.seed)
                     for r, sub in enumerate(subs)]
        for r, upd in self.stream_batch(sub_conds, subs, inner_stop, (slots or len(conds)) * k):
            i = r // k
            if i in stop:
                inner_stop.update(range(i * k, i * k + k))
                continue
            triangles[r].append(upd.triangles)
            tokens[r] += upd.tokens
            last[r] = upd.stats | {"candidates": k}
            left[i] -= upd.done
            if left[i]:
                yield i, StepUpdate([], empty, last[r])
                continue
            rows = range(i * k, i * k + k)
            meshes = {q: np.concatenate(triangles[q]) for q in rows}
            where = points[i] if points is not None else None
            ranks = {q: _candidate_rank(meshes[q], last[q], where) for q in rows}
            kept = min(rows, key=ranks.__getitem__)
            stats = last[kept] | {"candidate": kept - i * k, "seconds": max(last[q]["seconds"] for q in rows),
                                  "closed_candidates": sum(not rank[0] for rank in ranks.values())}
            fit = settings[i].fit and points is not None and len(meshes[kept]) > 0
            yield i, StepUpdate(tokens[kept], meshes[kept], stats, done=not fit, decoded=True)
            if fit:
                result = fit_worker.fit_here(meshes[kept], points[i], stats)
                yield i, _fit_update(result, stats, lambda i=i: cancelled(i))


def _candidate_rank(triangles: np.ndarray, stats: dict, points) -> tuple:
    """Sort key of one candidate of `candidates`: closed first, then complete (ended at EOS), then nearest the
    points it was decoded from (without them: more faces, the fuller mesh)."""
    near = distance_to_points(triangles, points) if points is not None else -len(triangles)
    return not closed(triangles), not stats.get("complete"), near


def batch_key(settings: DecodeSettings) -> tuple:
    """What objects decoded in one batch must share: everything but the seed, the limits and the fit."""
    d = dataclasses.asdict(settings)
    return tuple((k, v) for k, v in sorted(d.items()) if k not in ("seed", "max_tokens", "max_faces", "fit"))


class Decoded:
    """One object's decoding so far: its tokens up to `limit`, detokenized, cut at `max_faces` or where it stalled
    (`STALL_TOKENS`) and counted; what `Engine.stream` and each object of `stream_batch` report."""

    def __init__(self, max_faces: int | None, limit: int):
        self.max_faces, self.limit = max_faces, limit
        self.detok = tok.IncrementalDetokenizer()
        self.tokens: list[int] = []
        self.faces = 0
        self.full = False  # max_faces reached
        self.stalled = False  # STALL_TOKENS tokens in a row completed no face
        self._idle = 0  # tokens since the last face

    def add(self, new: list[int]) -> tuple[list[int], np.ndarray]:
        """This step's tokens (cut at the limit, or where the decode stalled) and the triangles they complete,
        (k, 3, 3) float32. Token by token, so that a stall cuts every decoder's sequence at the same token."""
        kept, tris = [], []
        for t in new[: self.limit - len(self.tokens)]:
            made = self.detok.push(t)
            kept.append(t)
            tris.append(made)
            self._idle = 0 if len(made) else self._idle + 1
            if self._idle >= STALL_TOKENS:
                self.stalled = True
                break
        self.tokens.extend(kept)
        tris = np.concatenate(tris) if tris else np.zeros((0, 3, 3), dtype=np.int64)
        if self.max_faces is not None:
            tris = tris[: max(0, self.max_faces - self.faces)]
        self.faces += len(tris)
        self.full = self.max_faces is not None and self.faces >= self.max_faces
        return kept, tok.dequantize(tris).astype(np.float32)

    @property
    def stopped(self) -> bool:
        """Cut here, before the decoder ended: at max_faces or stalled."""
        return self.full or self.stalled

    @property
    def complete(self) -> bool:
        """A whole mesh, once decoding is over: it ended at EOS, cut neither at max_faces, nor where it stalled, nor
        at the token limit."""
        return not self.stopped and len(self.tokens) < self.limit

    def final(self) -> dict:
        """The stats only the last update carries."""
        return {"complete": self.complete, "stalled": self.stalled}


class _Row(Decoded):
    """One object of a batch: its decoding, and the updates `stream_batch` yields for it."""

    def __init__(self, settings: DecodeSettings, limit: int, started: float):
        super().__init__(settings.max_faces, limit)
        self.settings = settings
        self.started = started  # when it took a slot
        self.parts: list[np.ndarray] = []  # the triangles so far (a fit needs them all)
        self.steps = 0
        self.done = False

    def push(self, new: list[int], ended: bool) -> StepUpdate:
        """This step's accepted tokens; `ended`: the decoder finished the sequence (EOS or the batch's limit)."""
        self.steps += 1
        new, tris = self.add(new)
        n = len(self.tokens)
        self.done = self.stopped or ended or n >= self.limit
        stats = {"steps": self.steps, "tokens": n, "scr": round(n / self.steps, 4), "faces": self.faces}
        if self.done:
            stats |= self.final()
        self.parts.append(tris)
        return StepUpdate(new, tris, stats, done=self.done, decoded=self.done)


def _fit_update(result: tuple, stats: dict, cancelled: Callable[[], bool]) -> StepUpdate:
    """An object's last update from `fit.fit_result`'s (fitted, fit stats): dropped if it was cancelled meanwhile."""
    fitted, fit_stats = result
    stats = stats | fit_stats
    if cancelled():
        stats = {k: v for k, v in stats.items() if not k.startswith("fit_")} | {"fit_skipped": "cancelled"}
        return StepUpdate([], np.zeros((0, 3, 3), np.float32), stats, done=True, decoded=True, cancelled=True)
    return StepUpdate([], np.zeros((0, 3, 3), np.float32), stats, done=True, decoded=True, fitted=fitted)
