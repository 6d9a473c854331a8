"""Install Backend: a private Python environment for the backend, made with pip (bpy-free; the preferences drive it).

The environment lives in a folder the add-on owns (the extension's user directory, given by the caller) as `env/`.
It is built in `env.partial/`: a venv from Blender's own Python, then torch (the build the caller chose: the
PyTorch CPU index, or pip's configured index, whose Linux torch is a CUDA build), then the backend's requirements
(`backend/requirements.txt`, bundled with the add-on), then a check that imports torch and the backend. Only then
is it moved to `env/` and the ready marker written, last: an environment without the marker (cancelled, failed,
crashed) is never used. The backend package itself is not copied in: the client puts the bundled `backend/` on its
import path, so an updated extension runs its own backend code at once.

`Install.run()` blocks (headless Blender, tests); `Install.start()` runs it in a thread and the UI reads `status`,
`log` and `state` meanwhile. pip's output is the log; its last meaningful line is the progress line.
"""
from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import client, locations

READY = "xspecmesh-ready.json"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CUDA_INDEX_WINDOWS = "https://download.pytorch.org/whl/cu128"  # PyPI's Windows torch is CPU-only
LOG_LINES = 400
# pip's words for "no package index could be reached" (urllib3 / requests messages it prints)
_OFFLINE = re.compile(r"NewConnectionError|Failed to establish a new connection|Name or service not known|"
                      r"Temporary failure in name resolution|getaddrinfo failed|Network is unreachable|"
                      r"ConnectTimeout|Read timed out|ProxyError|Could not fetch URL|SSLError|"
                      r"Connection refused|nodename nor servname")


class InstallError(RuntimeError):
    pass


def installed_python(folder: Path) -> Path | None:
    """The installed backend's Python when an install finished there (its marker exists), else None."""
    env = Path(folder) / "env"
    python = locations.env_python(env)
    return python if (env / READY).is_file() and python.is_file() else None


def requirements_file(backend: str | None = None) -> Path:
    path = Path(backend or locations.backend_path() or "") / "requirements.txt"
    if not path.is_file():
        raise InstallError(f"the backend's requirements are missing ({path}): reinstall the extension")
    return path


def default_torch_requirement(requirements: Path) -> str:
    """The torch line of the backend's requirements (what pyproject.toml installs too)."""
    for line in requirements.read_text(encoding="utf-8").splitlines():
        spec = line.split("#")[0].strip()
        if re.match(r"torch\b", spec):
            return spec
    return "torch"


def has_nvidia_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def torch_index(build: str, platform: str = sys.platform, gpu=has_nvidia_gpu) -> tuple[str, str | None]:
    """(the build, the index URL to install torch from; None: pip's configured index) for build auto|cpu|cuda."""
    if build == "auto":
        build = "cuda" if platform != "darwin" and gpu() else "cpu"
    if platform == "darwin":  # PyPI's macOS torch is the only one (CPU and Metal)
        return build, None
    if build == "cpu":
        return build, CPU_INDEX
    return build, CUDA_INDEX_WINDOWS if platform == "win32" else None


def explain(log: list[str], what: str) -> str:
    """One message for a failed pip step."""
    text = "\n".join(log[-60:])
    if _OFFLINE.search(text):
        return (f"pip could not reach a package index while installing {what}: check the internet connection "
                "(and a proxy, if any; pip reads HTTPS_PROXY), then press Install Backend again")
    if "No matching distribution" in text or "Could not find a version" in text:
        return f"pip found no {what} for this Python ({sys.version.split()[0]}) and system (see the log)"
    last = next((line for line in reversed(log) if line.strip()), "no output")
    return f"installing {what} failed: {last.strip()}"


class Install:
    """One install into `folder/env`. `state`: ready (not started), running, done, failed, cancelled."""

    def __init__(self, folder: Path, *, torch_requirement: str = "", index_url: str | None = None,
                 base_python: str = sys.executable, backend: str | None = None):
        self.folder = Path(folder)
        self.partial = self.folder / "env.partial"
        self.env = self.folder / "env"
        self.requirements = requirements_file(backend)
        self.backend = str(self.requirements.parent)
        self.torch_requirement = torch_requirement.strip() or default_torch_requirement(self.requirements)
        self.index_url = index_url or None
        self.base_python = base_python
        self.state, self.status, self.message = "ready", "", ""
        self.log: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self.python: Path | None = None  # the installed Python, once done
        self.seconds = 0.0
        self._proc: subprocess.Popen | None = None
        self._cancelled = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    def steps(self) -> list[tuple[str, list[str]]]:
        py = str(locations.env_python(self.partial))
        pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--progress-bar", "off"]
        index = ["--index-url", self.index_url] if self.index_url else []
        return [
            ("Python environment", [self.base_python, "-m", "venv", str(self.partial)]),
            (f"PyTorch ({self.torch_requirement})", [*pip, self.torch_requirement, *index]),
            ("the backend's packages", [*pip, "-r", str(self.requirements)]),
            ("checking the backend", [py, "-c", "import torch, xspecmesh.decoding.engine; "
                                      "print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"]),
        ]

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, daemon=True, name="xspecmesh-install")
        self._thread.start()

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            if self._proc is not None and self._proc.poll() is None:
                self._proc.terminate()

    def wait(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.finished

    def run(self) -> str:
        """The whole install, blocking; returns the final state (its message in `message`)."""
        started = time.perf_counter()
        self.state = "running"
        try:
            shutil.rmtree(self.partial, ignore_errors=True)
            self.folder.mkdir(parents=True, exist_ok=True)
            steps = self.steps()
            for number, (what, argv) in enumerate(steps, 1):
                self._step(f"Step {number} of {len(steps)}: {what}", what, argv)
            self._commit()
            self.state, self.message = "done", f"Backend installed in {self.env}"
        except InstallError as exc:
            self.state, self.message = ("cancelled", "Install cancelled") if self._cancelled else ("failed", str(exc))
        except OSError as exc:
            self.state, self.message = "failed", f"install failed: {exc}"
        finally:
            if self.state != "done":
                shutil.rmtree(self.partial, ignore_errors=True)
            self.seconds = time.perf_counter() - started
            self.status = self.message
            self.log.append(self.message)
        return self.state

    def _step(self, title: str, what: str, argv: list[str]) -> None:
        self.status = title
        self.log.append(f"== {title}")
        env = client.backend_environment(self.backend)
        env["PIP_NO_INPUT"] = "1"
        with self._lock:
            if self._cancelled:
                raise InstallError("cancelled")
            self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=env, text=True, encoding="utf-8", errors="replace", bufsize=1)
        lines = []
        for line in self._proc.stdout:
            line = line.rstrip()
            lines.append(line)
            self.log.append(line)
            if line.strip() and not line.startswith("WARNING"):  # pip's config warnings are no progress
                self.status = f"{title}: {line.strip()[:120]}"
        if self._proc.wait() != 0:
            raise InstallError(explain(lines, what))

    def _commit(self) -> None:
        """The finished environment becomes `env/`; the marker is written last."""
        shutil.rmtree(self.env, ignore_errors=True)
        os.replace(self.partial, self.env)
        self.python = locations.env_python(self.env)
        info = {"torch_requirement": self.torch_requirement, "index_url": self.index_url, "python": str(self.python),
                "installed": time.strftime("%Y-%m-%d %H:%M:%S")}
        (self.env / READY).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
