"""Which implementation runs a fused op: declared candidates and a measured choice.

Backend families (what `model.backend` reports):

- "triton":    the Triton kernels in fastsr.kernels; CUDA tensors, or CPU tensors when
               TRITON_INTERPRET=1 was set before the kernels were imported (the
               interpreter: correct but slow, for testing).
- "aten":      aten/cuDNN convolutions with the epilogues in place on their output, on CUDA:
               the floor, exactly what `eager_cl` runs in bench/run.py.
- "cpu":       the same aten code on CPU tensors (channels-last oneDNN convolutions with
               folded constants and in-place epilogues; fp32, and bf16 on CPUs with bf16
               instructions).
- "reference": the eager references in fastsr.ops.reference, any device.

Each family offers implementations (`Candidate`s) per op, each declaring as data what it
supports (`not_supported_reasons`). `choose(op, sig, requested)` picks one:

- requested None (auto): on CPU tensors the cpu implementation, without timing; on CUDA the
  first call for a (op, shapes, flags, dtype, GPU name) key times every candidate that can
  run it (CUDA events, fresh data of the real shapes) and caches the fastest in memory and,
  with FASTSR_PLAN_CACHE=path, on disk (keyed by GPU name, torch/Triton/fastsr versions).
- requested a family ("triton", ...): only that family's candidates (timed among them on
  CUDA); requested an implementation name ("triton_block", ...): exactly that one. A request
  that cannot run raises BackendUnavailable with every reason.
- `torch.use_deterministic_algorithms(True)` or FASTSR_DETERMINISTIC=1: no timing, the
  pinned choice = the first candidate in declared order that can run (the Triton kernels on
  CUDA: triton_block where its kernel takes the shape, else triton_convs; triton_conv;
  triton backward), so every process runs the same kernels. Under torch.compile tracing or
  CUDA-graph capture nothing is timed either: a cached choice, else the pinned one.

Forward and backward choices are separate ops ("conv2d" / "resblock" and their
"*_backward").
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from fastsr.errors import BackendUnavailable

BACKENDS = ("triton", "aten", "cpu", "openvino", "reference")
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Installation probes, asked once per process: an import-system lookup costs ~30 µs, and
# candidates' reasons are asked for every layer of every forward that is not memoized.
@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _has_openvino() -> bool:
    return importlib.util.find_spec("openvino") is not None


_NO_TRITON = "triton is not installed (pip install triton)"
_NO_OPENVINO = "openvino is not installed (pip install 'fastsr[openvino]')"


def machine_reasons(backend: str) -> list[str]:
    """Why `backend` cannot run on this machine at all, whatever the tensor (empty: it may).

    Checked when a model is built with backend=...: a machine without triton, or without
    CUDA and without the interpreter, fails then instead of at the first call.
    """
    check_backend_name(backend)
    reasons = []
    if backend == "triton" and not _has_triton():
        reasons.append(_NO_TRITON)
    if backend == "triton" and not torch.cuda.is_available() and not triton_interpreting():
        reasons.append("no CUDA device is available (torch.cuda.is_available() is False), and CPU tensors need "
                       "TRITON_INTERPRET=1 (the Triton interpreter, slow, for testing)")
    if backend == "openvino" and not _has_openvino():
        reasons.append(_NO_OPENVINO)
    if backend == "aten" and not torch.cuda.is_available():
        reasons.append("the aten backend is the CUDA floor (cuDNN); no CUDA device is available (use 'cpu')")
    return reasons


# ------------------------------------------------------------------------- signatures


@dataclass(frozen=True)
class Signature:
    """What a choice depends on: the op's input shapes, flags, dtype and device.

    shape: x's (N, C, H, W); cout, k: the conv's output channels and kernel size (a block:
    C and its k); flags: the epilogues that change the work (relu, skip, shuffle, in_shift).
    device_name: the GPU's name on CUDA ("cpu" on the CPU), so a cache never mixes GPUs."""

    op: str
    device_type: str
    device_name: str
    dtype: torch.dtype
    shape: tuple[int, int, int, int]
    cout: int
    k: int
    flags: tuple = ()

    @staticmethod
    def of(op: str, x: torch.Tensor, weight: torch.Tensor, flags: tuple = ()) -> "Signature":
        return Signature(op, x.device.type, device_name(x.device), x.dtype, tuple(int(s) for s in x.shape),
                         int(weight.shape[0]), int(weight.shape[-1]), tuple(flags))

    def key(self) -> str:
        """The cache key, as text (the disk cache is JSON)."""
        dtype = str(self.dtype).replace("torch.", "")
        return f"{self.op}|{self.device_name}|{dtype}|{'x'.join(map(str, self.shape))}|{self.cout}|{self.k}|{self.flags}"


_DEVICE_NAMES: dict[int, str] = {}


def device_name(device: torch.device) -> str:
    """"NVIDIA H200"-style name of a CUDA device, the CPU's model name (from /proc/cpuinfo
    where there is one) for the CPU, else the device type. Cached."""
    if device.type == "cpu":
        return _cpu_name()
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DEVICE_NAMES:
        _DEVICE_NAMES[index] = torch.cuda.get_device_name(index)
    return _DEVICE_NAMES[index]


_CPU_NAME: list[str] = []


def _cpu_name() -> str:
    if not _CPU_NAME:
        name = "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
        except OSError:
            pass
        _CPU_NAME.append(f"cpu {name} x{torch.get_num_threads()}")
    return _CPU_NAME[0]


# ------------------------------------------------------------------------- candidates


@dataclass(frozen=True)
class Candidate:
    """One implementation of one op and what it supports, as data.

    devices: the device types it runs on; interpreted: also CPU tensors when the Triton
    interpreter is on; max_channels: the largest C (or Cout) it takes, None for any."""

    name: str
    op: str
    family: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] = _FLOAT
    kernel_sizes: tuple[int, ...] = (1, 3, 5)
    max_channels: int | None = None
    needs_triton: bool = False
    interpreted: bool = False
    extra: Callable[[Signature], list[str]] | None = field(default=None, compare=False)

    def not_supported_reasons(self, sig: Signature) -> list[str]:
        """Why this implementation cannot run an op of signature `sig` (empty: it can)."""
        reasons = []
        if self.needs_triton and not _has_triton():
            reasons.append(_NO_TRITON)
        on_cpu_interpreted = self.interpreted and sig.device_type == "cpu"
        if on_cpu_interpreted and not triton_interpreting():
            reasons.append("CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter, slow, for testing)")
        elif sig.device_type not in self.devices and not on_cpu_interpreted:
            where = "/".join(self.devices) + (" (CPU under the Triton interpreter)" if self.interpreted else "")
            reasons.append(f"runs on {where} tensors, got a {sig.device_type} tensor")
        if sig.dtype not in self.dtypes:
            names = "/".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"dtype {str(sig.dtype).replace('torch.', '')} is not one of {names}")
        if sig.k not in self.kernel_sizes:
            reasons.append(f"kernel size {sig.k} is not one of {self.kernel_sizes}")
        if self.max_channels is not None and max(sig.shape[1], sig.cout) > self.max_channels:
            reasons.append(f"{max(sig.shape[1], sig.cout)} channels exceed its limit of {self.max_channels}")
        if self.extra is not None:
            reasons += self.extra(sig)
        return reasons


def _block_kernel_reasons(sig: Signature) -> list[str]:
    from fastsr.ops.backends.triton import block_supported

    if _has_triton() and not block_supported(sig.shape[1], sig.k):
        return [f"the one-launch block kernel does not take C={sig.shape[1]}, k={sig.k} "
                "(fastsr.kernels.resblock.resblock_supported)"]
    return []


def _openvino_reasons(sig: Signature) -> list[str]:
    if not _has_openvino():
        return [_NO_OPENVINO]
    return [] if sig.shape[0] > 0 else ["an empty batch"]


_TRITON = dict(devices=("cuda",), needs_triton=True, interpreted=True)
_ATEN = _FLOAT + (torch.float64,)  # aten's convolutions take float64 too (gradcheck runs there)
# In declared order: the pinned (deterministic) choice is the first that can run.
CANDIDATES: Mapping[str, tuple[Candidate, ...]] = {
    "conv2d": (
        Candidate("triton_conv", "conv2d", "triton", **_TRITON),
        Candidate("aten", "conv2d", "aten", devices=("cuda",), dtypes=_ATEN),
        Candidate("cpu", "conv2d", "cpu", devices=("cpu",), dtypes=_ATEN),
    ),
    "resblock": (
        Candidate("triton_block", "resblock", "triton", extra=_block_kernel_reasons, **_TRITON),
        Candidate("triton_convs", "resblock", "triton", **_TRITON),
        Candidate("aten", "resblock", "aten", devices=("cuda",), dtypes=_ATEN),
        Candidate("cpu", "resblock", "cpu", devices=("cpu",), dtypes=_ATEN),
    ),
    # The whole network at once, for CPU inference only (a module in eval mode, no
    # gradients): fastsr's fused ops (each layer then its own choice) or OpenVINO's compile
    # of the eager graph (fastsr.ops.backends.openvino). Timed on the CPU too: it is one
    # choice per input shape and dtype, and the two are close enough that only a
    # measurement can tell (issue table: OpenVINO 1.2-1.8x faster on a Zen 5).
    "model": (
        Candidate("fused", "model", "cpu", devices=("cpu",)),
        Candidate("openvino", "model", "openvino", devices=("cpu",), dtypes=(torch.float32, torch.bfloat16),
                  extra=_openvino_reasons),
    ),
    "conv2d_backward": (
        Candidate("triton", "conv2d_backward", "triton", **_TRITON),
        Candidate("aten", "conv2d_backward", "aten", devices=("cuda", "cpu"), dtypes=_ATEN),
    ),
    "resblock_backward": (
        Candidate("triton", "resblock_backward", "triton", **_TRITON),
        Candidate("aten", "resblock_backward", "aten", devices=("cuda", "cpu"), dtypes=_ATEN),
    ),
}
FAMILY = {c.name: c.family for cands in CANDIDATES.values() for c in cands} | {"reference": "reference"}


def candidate(op: str, name: str) -> Candidate:
    """The candidate of `op` called `name`; ValueError listing what a backend may be."""
    for c in CANDIDATES[op]:
        if c.name == name:
            return c
    raise ValueError(f"backend must be one of {BACKENDS} or an implementation of {op} "
                     f"({', '.join(c.name for c in CANDIDATES[op])}), got {name!r}")


def _eligible(op: str, requested: str | None, sig: Signature) -> tuple[list[Candidate], list[str]]:
    """(the candidates `requested` allows that can run sig, the reasons of those that cannot)."""
    pool = list(CANDIDATES[op])
    if requested in BACKENDS:
        # A family: its own implementations. A forward family's backward is its own too,
        # except the cpu one, whose gradients are aten's (the same aten code on CPU tensors).
        family = "aten" if (requested == "cpu" and op.endswith("_backward")) else requested
        pool = [c for c in pool if c.family == family]
    elif requested is not None:
        pool = [candidate(op, requested)]
    elif sig.device_type != "cuda":  # auto off CUDA: the native path only, never the interpreter
        pool = [c for c in pool if not c.interpreted]
    ok, reasons = [], []
    for c in pool:
        why = c.not_supported_reasons(sig)
        (reasons.extend(f"{c.name}: {r}" for r in why) if why else ok.append(c))
    return ok, reasons


# ------------------------------------------------------------------------- the choice


@dataclass(frozen=True)
class Choice:
    """What runs an op: the implementation, its family, and the timings that chose it
    (milliseconds per candidate; None when nothing was timed)."""

    name: str
    family: str
    times_ms: dict[str, float] | None = None


def deterministic() -> bool:
    """No timing: torch.use_deterministic_algorithms(True) or FASTSR_DETERMINISTIC=1."""
    return torch.are_deterministic_algorithms_enabled() or os.environ.get("FASTSR_DETERMINISTIC") == "1"


def _timing_allowed(sig: Signature) -> bool:
    if (sig.device_type != "cuda" and sig.op != "model") or deterministic() or torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def cuda_event_timer(runs: Mapping[str, Callable[[], object]], warmup: int = 2, reps: int = 5) -> dict[str, float]:
    """Median milliseconds of each callable, timed with CUDA events, interleaved rounds (so
    clock and thermal drift hit every candidate alike)."""
    for run in runs.values():
        for _ in range(warmup):  # the first call also autotunes / compiles
            run()
    torch.cuda.synchronize()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end))
    return {name: statistics.median(t) for name, t in samples.items()}


def wall_timer(runs: Mapping[str, Callable[[], object]], warmup: int = 1, reps: int = 3) -> dict[str, float]:
    """Median wall-clock milliseconds of each callable (CPU work), interleaved rounds."""
    for run in runs.values():
        for _ in range(warmup):  # the first call also converts / compiles
            run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in samples.items()}


# The timer is replaceable (tests inject fake timings; see set_timer); None: by device.
_timer: Callable[[Mapping[str, Callable[[], object]]], dict[str, float]] | None = None
_memory: dict[str, Choice] = {}   # timed choices, by cache key
_settled: dict[tuple, Choice] = {}  # choices with a single eligible candidate (no timing to do)


def set_timer(timer: Callable | None) -> None:
    """Use `timer(runs) -> {name: ms}` for timed choices (None: the CUDA-event timer)."""
    global _timer
    _timer = timer


def clear_cache() -> None:
    """Forget every choice made in this process (the disk cache is left as it is)."""
    _memory.clear()
    _settled.clear()


def _choice_key(sig: Signature, requested: str | None) -> str:
    """The key of a timed choice, in memory and in the disk cache."""
    return f"{sig.key()}|{requested}"


def would_time(op: str, sig: Signature, requested: str | None = None) -> bool:
    """Whether `choose(op, sig, requested, make_run)` would time candidates now (rather than
    return a settled, remembered, cached or pinned choice): what it costs, in time and in the
    candidates' memory, before the first run of a new signature."""
    key = _choice_key(sig, requested)
    if requested == "reference" or key in _memory:
        return False
    ok, _ = _eligible(op, requested, sig)
    return len(ok) > 1 and _timing_allowed(sig) and key not in _load_disk()


def choose(op: str, sig: Signature, requested: str | None = None,
           make_run: Callable[[str], Callable[[], object]] | None = None) -> Choice:
    """The implementation of `op` for inputs of signature `sig` (see the module docstring).

    make_run(name) -> a callable running that candidate once on fresh inputs of sig's
    shapes; needed when the choice may be timed (CUDA, several candidates)."""
    if requested == "reference":
        return Choice("reference", "reference")
    settled = (op, sig, requested, triton_interpreting())
    if settled in _settled:  # one eligible candidate: no state but the interpreter flag changes it
        return _settled[settled]
    key = _choice_key(sig, requested)
    if key in _memory:  # timed before: the eligible set it was timed among has not changed
        return _memory[key]
    ok, reasons = _eligible(op, requested, sig)
    if not ok:
        if requested is None:  # auto: the reference always runs
            return Choice("reference", "reference")
        raise BackendUnavailable(f"backend {requested!r} cannot run {op} on a {sig.device_type} "
                                 f"{str(sig.dtype).replace('torch.', '')} tensor: " + "; ".join(reasons))
    if len(ok) == 1:
        _settled[settled] = Choice(ok[0].name, ok[0].family)
        return _settled[settled]
    if not _timing_allowed(sig) or make_run is None:
        found = _load_disk().get(key) if not deterministic() else None
        return found or Choice(ok[0].name, ok[0].family)  # the pinned choice: declared order
    found = _load_disk().get(key)
    if found is None:
        timer = _timer or (cuda_event_timer if sig.device_type == "cuda" else wall_timer)
        times = timer({c.name: make_run(c.name) for c in ok})
        best = min(ok, key=lambda c: times[c.name])
        found = Choice(best.name, best.family, {name: round(float(ms), 4) for name, ms in times.items()})
        _save_disk(key, found)
    _memory[key] = found
    return found


# ------------------------------------------------------------------------- disk cache


def cache_versions() -> dict[str, str]:
    """What a disk cache entry is only valid for (with the GPU name in each key)."""
    from fastsr import __version__

    versions = {"fastsr": __version__, "torch": torch.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = "none"
    return versions


_default_plan_cache: str | None = None  # the command line sets one (set_default_plan_cache)


def set_default_plan_cache(path: str | None) -> None:
    """Where choices persist when FASTSR_PLAN_CACHE is unset (the library's default: nowhere;
    the `fastsr` command line: ~/.cache/fastsr/plans.json)."""
    global _default_plan_cache
    _default_plan_cache = path


def plan_cache_path() -> str | None:
    """FASTSR_PLAN_CACHE (empty: no disk cache), else the default set for this process."""
    path = os.environ.get("FASTSR_PLAN_CACHE", _default_plan_cache)
    return path or None


_disk: dict[str, Choice] | None = None
_disk_path: str | None = None


def _load_disk() -> dict[str, Choice]:
    """The FASTSR_PLAN_CACHE file's choices ({} without one, or for a stale or unreadable file)."""
    global _disk, _disk_path
    path = plan_cache_path()
    if not path:
        return {}
    if _disk is not None and _disk_path == path:
        return _disk
    _disk, _disk_path = {}, path
    try:
        with open(path) as f:
            data = json.load(f)
        if data.get("versions") == cache_versions():
            _disk = {k: Choice(v["implementation"], FAMILY[v["implementation"]], v.get("times_ms"))
                     for k, v in data.get("choices", {}).items() if v.get("implementation") in FAMILY}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # absent, damaged or foreign: measured again and rewritten
    return _disk


def _save_disk(key: str, choice: Choice) -> None:
    path = plan_cache_path()
    if not path:
        return
    from fastsr.atomic import atomic_write

    disk = _load_disk()
    disk[key] = choice
    data = {"versions": cache_versions(),
            "choices": {k: {"implementation": c.name, "times_ms": c.times_ms} for k, c in sorted(disk.items())}}

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)

    try:
        atomic_write(path, write)
    except OSError:
        pass  # a read-only cache location must not break a forward: the choice stays in memory


def unsupported_reasons(backend: str, x: torch.Tensor) -> list[str]:
    """Why no implementation of the family `backend` can run a conv on a tensor like x
    (empty list: one can)."""
    check_backend_name(backend)
    if backend == "reference":
        return [] if x.is_floating_point() else [f"dtype {x.dtype} is not floating point"]
    ok, reasons = _eligible("conv2d", backend, _probe(x))
    return [] if ok else reasons


def choose_backend(x: torch.Tensor, requested: str | None = None) -> str:
    """The backend family a model forward on x runs: `requested` (BackendUnavailable when
    it cannot), else the first that can: "triton" on CUDA (timing may still pick the aten
    floor for some layers: model.plan says), "cpu" on CPU tensors, "reference" elsewhere."""
    return choose("conv2d", _probe(x), requested).family


def _probe(x: torch.Tensor) -> Signature:
    """A stand-in conv signature for x's device and dtype (family questions ask no shapes)."""
    return Signature("conv2d", x.device.type, x.device.type, x.dtype, (1, 64, 8, 8), 64, 3)
