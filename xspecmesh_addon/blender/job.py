"""Retopology jobs as explicit state machines, driven one step at a time from the main thread.

`Job` is one object: sample → send → grow the result as faces arrive → weld and name it. `Run` is one object, or
every object of a collection, through one backend; it owns the backend's replies and hands each to its job. A
collection is sampled first and sent all at once (each request but the last marked "more", see protocol.py), so the
backend decodes its objects together in batches; each result grows as its faces arrive. The same `Run.step` is
called from a modal timer (interactive) or from a blocking loop (headless, `bpy.app.background`), so both paths run
exactly the same code.

States of a job: "running" → "done" | "cancelled" | "failed". A run adds "skipped" outcomes for objects that could
not start (e.g. an empty mesh) and "not run" for those left when the run was cancelled or the backend died.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import bpy

from ..core import sampling, service
from ..core.buffers import TriangleBuffer
from ..core.request import DecodeRequest
from .result import ResultObject

_ids = itertools.count(1)
ACTIVE: "Run | None" = None  # the run in progress; the panel and the cancel operator look here
LAST: "Run | None" = None  # the last finished run (its outcomes), for scripts
listeners: list = []  # callables(run) after every step: redraw the sidebar (tests use it to act mid-run)


@dataclass
class Outcome:
    """What became of one object; `summary()` is the line the user reads."""

    source: str
    state: str  # done | cancelled | failed | skipped | not run
    result: str | None = None
    faces: int = 0
    seconds: float = 0.0
    scr: float | None = None
    tokens_per_second: float | None = None
    message: str = ""
    stats: dict = field(default_factory=dict)

    def summary(self) -> str:
        if self.state in ("skipped", "not run") or (self.state == "failed" and not self.faces):
            return f"{self.source}: {self.state} ({self.message})" if self.message else f"{self.source}: {self.state}"
        scr = f"{self.scr:.2f}" if self.scr is not None else "n/a"
        tps = f", {self.tokens_per_second:.0f} tokens/s" if self.tokens_per_second else ""
        text = f"{self.source}: {self.faces} faces in {self.seconds:.1f} s, SCR {scr}{tps}"
        if self.state == "done" and ("fit_error" in self.stats or "fit_skipped" in self.stats):
            why = ("the fit failed" if "fit_error" in self.stats else
                   "the model looped, making no new face, and was stopped" if self.stats.get("stalled") else
                   "cut at the face or token limit")
            text += f", not fitted to the source ({why})"
        if self.state != "done":
            text += f" — {self.state}" + (f": {self.message}" if self.message else "")
            text += f", partial result kept as '{self.result}'" if self.result else ""
        return text


class Job:
    """One object through the backend. `handle(msg)` takes its replies; `finish()` returns the Outcome."""

    def __init__(self, source, request: DecodeRequest, client, collections, hide_source: bool,
                 cloud: sampling.PointCloud, object_axes: bool = False, more: bool = False):
        """`cloud`: the object's points, sampled by the run (a SamplingError there means the job never starts)."""
        self.source_name = source.name
        self.request = request
        self.client = client
        self.hide_source = hide_source
        self.object_axes = object_axes
        self.id = f"job{next(_ids)}"
        self.state = "running"
        self.message = ""
        self.progress: dict = {}
        self.stats: dict = {}
        self.triangles = TriangleBuffer()
        self.started = time.perf_counter()
        self.result = ResultObject(source, collections, cloud.to_world)
        try:
            client.generate(self.id, cloud.data, cloud.count, request.settings(), more=more)
        except Exception as exc:
            self.result.remove()
            raise service.BackendUnavailable(str(exc)) from None

    @property
    def finished(self) -> bool:
        return self.state != "running"

    @property
    def faces(self) -> int:
        return len(self.triangles)

    def fraction(self) -> float:
        """Rough progress: the request stops at EOS, max_faces or max_tokens, whichever comes first."""
        tokens = self.progress.get("tokens") or 0
        f = max(self.faces / (self.request.max_faces or float("inf")), tokens / self.request.max_tokens)
        return 1.0 if self.finished else min(f, 0.99)

    def handle(self, msg: dict) -> None:
        if self.finished:
            return
        kind = msg.get("type")
        if msg.get("id") is None and kind == "error":  # the backend is gone
            print(f"XSpecMesh: {msg.get('message')}")
            self.state, self.message = "failed", service.readable(msg.get("message", "backend stopped"))
            return
        if msg.get("id") != self.id:
            return  # a late reply to an earlier (cancelled) request
        if kind == "faces":
            self.triangles.extend(msg.get("triangles") or [])
        elif kind == "progress":
            self.progress = msg
        elif kind == "done":
            self.stats = dict(msg.get("stats") or {})
            if "fitted" in msg and not self.triangles.replace(msg["fitted"]):
                print("XSpecMesh: the fitted mesh does not match the faces received; keeping them as generated")
            if "fit_error" in self.stats:  # the report says "not fitted"; the console has the reason
                print(f"XSpecMesh: Fit to Source failed ({self.stats['fit_error']}); keeping the mesh as generated")
            self.state = "cancelled" if msg.get("cancelled") else "done"
            if self.state == "cancelled":
                self.message = self.message or "cancelled"
        elif kind == "error":
            print(f"XSpecMesh: {msg.get('message')}")
            self.state, self.message = "failed", service.readable(msg.get("message", "backend error"))

    def cancel(self) -> None:
        """Ask the backend to stop; the job ends when its `done` (cancelled) arrives."""
        if not self.finished:
            self.message = "cancelled"
            try:
                self.client.cancel(self.id)
            except Exception as exc:
                self.state, self.message = "failed", _first_line(str(exc))

    def refresh(self) -> None:
        """Show everything received so far: one mesh rebuild per call, and only when new faces came in."""
        if self.triangles.dirty:
            self.result.show(self.triangles.triangles)
            self.triangles.mark_shown()

    def finish(self) -> Outcome:
        stats = self.stats or {k: v for k, v in self.progress.items() if k not in ("type", "id")}
        seconds = stats.get("seconds")
        seconds = float(seconds) if isinstance(seconds, (int, float)) else time.perf_counter() - self.started
        info = {"request": self.request.settings(), "object_axes": self.object_axes, "stats": stats,
                "state": self.state}
        name = self.result.finish(self.triangles.triangles, partial=self.state != "done", info=info)
        if self.state == "done" and name is None:
            self.state, self.message = "failed", "the model produced no faces"
        if self.state == "done" and self.hide_source:
            source = bpy.data.objects.get(self.source_name)
            if source is not None:
                try:
                    source.hide_set(True)
                except RuntimeError:  # not in the current view layer
                    source.hide_viewport = True
        faces = len(bpy.data.objects[name].data.polygons) if name else 0
        return Outcome(self.source_name, self.state, name, faces, seconds, _number(stats.get("scr")),
                       _number(stats.get("tokens_per_second")), self.message, stats)


class Run:
    """Objects through one backend — a collection (`batch`) all sent at once; `step()` until `finished`.

    It begins with the backend's start (`service.Startup`, maybe already running) and connects once that is done.
    """

    def __init__(self, sources: list[str], request: DecodeRequest, startup, collections_for, *,
                 hide_source: bool = False, object_axes: bool = False, batch: bool = False,
                 prepared: dict | None = None):
        self.sources = list(sources)
        self.prepared = dict(prepared or {})  # source name → PointCloud sampled ahead (see `sample_ahead`)
        self.request = request
        self.startup = startup
        self.client = None  # set once the backend said hello
        self.collections_for = collections_for  # source object → collections to put its result in
        self.hide_source = hide_source
        self.object_axes = object_axes  # sample each object in its own axes (see `sampling.axes_frame`)
        self.batch = batch
        self.index = 0  # sources[:index] have been started or skipped
        self.jobs: list[Job] = []  # running
        self.outcomes: list[Outcome] = []
        self.stop_requested = False
        self.cancel_requested = False  # by the user (Cancel, Esc), as opposed to a failure
        self.started = time.perf_counter()

    @property
    def starting(self) -> bool:
        """Waiting for the backend to start (the panel says so)."""
        return self.client is None and not self.finished

    @property
    def job(self) -> Job | None:
        """The first running job (what the panel shows)."""
        return self.jobs[0] if self.jobs else None

    @property
    def finished(self) -> bool:
        return not self.jobs and (self.index >= len(self.sources) or self.stop_requested)

    def fraction(self) -> float:
        current = sum(j.fraction() for j in self.jobs)
        return min(1.0, (len(self.outcomes) + current) / max(1, len(self.sources)))

    def cancel(self) -> None:
        """Stop every running object now; finished objects stay, partial results are kept as '(partial)'."""
        for job in self.jobs:
            job.cancel()
        self.stop_requested = self.cancel_requested = True
        if self.finished:  # nothing was running (e.g. the backend still starting): account for every object now
            self._close()

    def step(self, timeout: float = 0.0) -> None:
        """Connect once the backend is up, start the next object if none runs, drain every reply that arrived,
        rebuild the live mesh once."""
        if self.client is None and not self.finished:
            self._connect(timeout)
        if self.client is not None and not self.jobs:
            self._start_next()
        if self.jobs:
            self._dispatch(self.client.poll(timeout))
            if not self.client.alive and not all(j.finished for j in self.jobs):  # died without a word (poll lags)
                self._dispatch(self.client.poll(0.5))
                self._dispatch([{"type": "error", "id": None, "message": "backend stopped unexpectedly"}])
            for job in [j for j in self.jobs if j.finished]:
                self._finish_job(job)
            for job in self.jobs:
                job.refresh()
        if self.finished:
            self._close()
        for listener in list(listeners):
            listener(self)

    def _connect(self, timeout: float) -> None:
        if not self.startup.wait(timeout):
            return
        try:
            self.client = service.adopt(self.startup)
        except service.BackendUnavailable as exc:
            self.outcomes.append(Outcome(self.sources[self.index], "failed", message=str(exc)))
            self.index += 1
            self.stop_requested = True
            return
        # known now: a request never asks for more heads than the checkpoint has
        self.request = self.request.capped(service.heads_cap())

    def _dispatch(self, messages: list[dict]) -> None:
        for msg in messages:
            for job in self.jobs:
                if msg.get("id") in (None, job.id):  # id None: the backend is gone, every job hears it
                    job.handle(msg)

    def _start_next(self) -> None:
        """Single object: start it. Batch: sample every remaining object (those with nothing to sample are skipped),
        then send them all, each but the last marked "more" so the backend starts them together."""
        ready = []
        while self.index < len(self.sources) and not self.stop_requested and (self.batch or not ready):
            name = self.sources[self.index]
            self.index += 1
            source = bpy.data.objects.get(name)
            try:
                if source is None:
                    raise sampling.SamplingError(f"'{name}' no longer exists")
                cloud = self.prepared.pop(name, None) or sampling.condition_from_object(
                    source, bpy.context.evaluated_depsgraph_get(), seed=self.request.seed,
                    object_axes=self.object_axes)
                ready.append((source, cloud))
            except sampling.SamplingError as exc:
                self.outcomes.append(Outcome(name, "skipped", message=str(exc)))
        for k, (source, cloud) in enumerate(ready):
            try:
                self.jobs.append(Job(source, self.request, self.client, self.collections_for(source),
                                     self.hide_source, cloud, self.object_axes, more=k < len(ready) - 1))
            except service.BackendUnavailable as exc:
                self.outcomes.append(Outcome(source.name, "failed", message=_first_line(str(exc))))
                self.stop_requested = True
                break

    def _finish_job(self, job: Job) -> None:
        self.outcomes.append(job.finish())
        self.jobs.remove(job)
        if not self.client.alive:  # no point going on without a backend
            service.forget()
            self.stop_requested = True

    def _close(self) -> None:
        """Every object without an outcome (not started, or left when the backend died) is 'not run'; the outcomes
        follow the order of the sources."""
        seen = {o.source for o in self.outcomes}
        self.outcomes += [Outcome(name, "not run", message="stopped before this object")
                          for name in self.sources if name not in seen]
        order = {name: i for i, name in enumerate(self.sources)}
        self.outcomes.sort(key=lambda o: order.get(o.source, len(order)))

    def abort(self) -> None:
        """Blender is loading another file or quitting: drop the current results without waiting for the backend."""
        for job in self.jobs:
            job.cancel()
            job.result.remove()
        self.jobs = []
        self.stop_requested = True

    def run_blocking(self, tick: float = 0.05) -> None:
        """The headless driver: the same steps as the modal timer, waiting on the backend in between."""
        try:
            while not self.finished:
                self.step(timeout=tick)
        except KeyboardInterrupt:
            self.cancel()
            while not self.finished:
                self.step(timeout=tick)


def sample_ahead(source, seed: int, object_axes: bool = False) -> dict:
    """Sample an object before the backend starts, so an object with nothing to sample fails at once."""
    depsgraph = bpy.context.evaluated_depsgraph_get()
    return {source.name: sampling.condition_from_object(source, depsgraph, seed=seed, object_axes=object_axes)}


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else "unknown error"


def _number(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None
