"""The optional C++ extension ``fastsr._C``: built on first use, with pure-PyTorch fallbacks.

Three CPU ops, registered as ``torch.ops.fastsr_ext.*`` by the sources in ``csrc/``:

- ``imresize_fast``: MATLAB-compatible bicubic resize, bit-for-bit the computation of
  ``fastsr.imresize.imresize`` (up to float summation order) with sparse per-axis taps
  instead of dense matrices;
- ``sample_patches``: a batch of aligned, augmented LR/HR training patches, float32 in one
  pass, from a counter-based splitmix64 stream (see ``csrc/patches.cpp``) that the
  PyTorch path here reproduces exactly, so both backends return the same batch;
- ``to_uint8_hwc``: float SR output to rounded (half to even), clamped uint8 HWC.

Nothing is compiled at install time. The first call of a wrapper builds the extension
with ``torch.utils.cpp_extension.load`` (ninja, about a minute) into a folder named by a
hash of the sources, flags, compiler, torch/Python versions and CPU (the build uses
``-march=native``): ``$FASTSR_EXT_DIR``, else ``$TORCH_EXTENSIONS_DIR/fastsr``, else
``$XDG_CACHE_HOME/fastsr/ext`` (``~/.cache/fastsr/ext``). Later processes load the
cached library directly. ``FASTSR_NO_EXT=1`` skips the extension; with no compiler or
ninja, or a failed build, one warning says how to get the fast path and the PyTorch
versions run. ``backend="cpp"`` on a wrapper demands the extension
(``BackendUnavailable`` with the reason otherwise); ``backend="torch"`` never uses it;
``backend_used(op)`` says what ran last.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

from fastsr.data import augment  # one definition of the flip/transpose order
from fastsr.errors import BackendUnavailable

__all__ = [
    "Patches", "backend_used", "build_directory", "extension_status", "imresize_fast", "last_backend",
    "load_extension", "patch_draws", "sample_patches", "source_dir", "to_uint8_hwc",
]

Tensor = torch.Tensor

EXT_NAME = "fastsr_C"
_SOURCES = ("ops.cpp", "imresize.cpp", "patches.cpp")
_HEADERS = ("fastsr_ext.h",)
# -ffp-contract=off: no fused multiply-adds in the weight formulas, so they round exactly
# as the Python float64 code does. -fopenmp: at::parallel_for is an inline OpenMP region.
_CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp")
_LDFLAGS = ("-fopenmp",)
# A build lock older than this was left by a killed build (cpp_extension would wait forever).
_STALE_LOCK_S = 15 * 60

_lock = threading.RLock()
_state: dict = {"tried": False, "ops": None, "reason": None, "warned": False}
# What each wrapper ran at its last call: {"imresize": "cpp" | "torch", ...}.
last_backend: dict[str, str] = {}


# ---------------------------------------------------------------------------------------
# Finding, building and loading
# ---------------------------------------------------------------------------------------


def source_dir() -> Path | None:
    """The folder holding the C++ sources: ``fastsr/csrc`` when installed, ``csrc/`` in the repository."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if all((candidate / f).is_file() for f in _SOURCES + _HEADERS):
            return candidate
    return None


def _cpu_tag() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
        keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return platform.machine() + "\n" + "\n".join(sorted(set(keep)))
    except OSError:
        return platform.machine() + platform.processor()


def _cache_root() -> Path:
    if os.environ.get("FASTSR_EXT_DIR"):
        return Path(os.environ["FASTSR_EXT_DIR"]).expanduser()
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]).expanduser() / "fastsr"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "fastsr" / "ext"


def build_directory(src: Path | None = None) -> Path:
    """Where the library for these sources, flags, compiler, torch, Python and CPU lives."""
    src = src or source_dir()
    h = hashlib.sha256()
    for name in _SOURCES + _HEADERS:
        h.update(name.encode() + b"\0" + ((src / name).read_bytes() if src else b"") + b"\0")
    for part in (_CFLAGS, _LDFLAGS, torch.__version__, torch.version.git_version, sys.version,
                 os.environ.get("CXX", "c++"), _cpu_tag()):
        h.update(repr(part).encode() + b"\0")
    return _cache_root() / f"{EXT_NAME}-{h.hexdigest()[:16]}"


def _how_to_fix() -> str:
    return ("install a C++ compiler (g++ or clang++, e.g. `apt install g++`) and ninja (`pip install ninja`), "
            "then restart Python; set FASTSR_NO_EXT=1 to silence this")


def _fail(reason: str, warn: bool) -> None:
    _state["reason"] = reason
    if warn and not _state["warned"]:
        _state["warned"] = True
        warnings.warn(f"fastsr: the C++ extension is unavailable ({reason}); using the slower pure-PyTorch "
                      f"versions. To get the fast path: {_how_to_fix()}.", RuntimeWarning, stacklevel=3)


def _remove_stale_lock(build_dir: Path) -> None:
    lock = build_dir / "lock"
    try:
        if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
            lock.unlink()
    except OSError:
        pass


def _first_error(err: Exception) -> str:
    """The first compiler `error:` line of a failed build (else the last line), shortened."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    picked = next((ln for ln in lines if "error:" in ln), lines[-1] if lines else type(err).__name__)
    return picked[:300]


def _build(src: Path, build_dir: Path, verbose: bool) -> None:
    from torch.utils import cpp_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_lock(build_dir)
    if verbose or not (build_dir / f"{EXT_NAME}{cpp_extension.LIB_EXT}").exists():
        print(f"fastsr: compiling the C++ extension (first use, about a minute) in {build_dir}", file=sys.stderr)
    cpp_extension.load(
        name=EXT_NAME,
        sources=[str(src / f) for f in _SOURCES],
        extra_cflags=list(_CFLAGS),
        extra_ldflags=list(_LDFLAGS),
        build_directory=str(build_dir),
        is_python_module=False,  # the library registers torch.ops.fastsr_ext itself
        verbose=verbose,
    )


def load_extension(verbose: bool = False):
    """``torch.ops.fastsr_ext`` with the compiled ops, or None (``extension_status()`` says why).

    Builds on the first call of the process if no cached build matches; later calls return
    the cached result at once. Thread-safe; concurrent processes share the build (ninja's lock).
    """
    if _state["tried"]:
        return _state["ops"]
    with _lock:
        if _state["tried"]:
            return _state["ops"]
        _state["tried"] = True
        if os.environ.get("FASTSR_NO_EXT", "").strip() not in ("", "0"):
            _fail("disabled by FASTSR_NO_EXT", warn=False)
            return None
        if hasattr(torch.ops, "fastsr_ext") and hasattr(torch.ops.fastsr_ext, "imresize"):
            _state["ops"] = torch.ops.fastsr_ext  # loaded earlier in this process
            return _state["ops"]
        src = source_dir()
        if src is None:
            _fail("its C++ sources (csrc/*.cpp) are not installed with this copy of fastsr", warn=True)
            return None
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None:
            _fail(f"no C++ compiler: `{cxx}` is not on PATH", warn=True)
            return None
        from torch.utils import cpp_extension

        if not cpp_extension.is_ninja_available():
            _fail("ninja is not installed", warn=True)
            return None
        try:
            build_dir = build_directory(src)
            lib = build_dir / f"{EXT_NAME}{cpp_extension.LIB_EXT}"
            try:
                # The folder name is a hash of everything the build depends on, so a library
                # there is current: load it without running ninja.
                if not lib.exists() or (build_dir / "lock").exists():
                    raise FileNotFoundError(lib)
                torch.ops.load_library(str(lib))
            except FileNotFoundError:
                _build(src, build_dir, verbose)
            except OSError:
                lib.unlink(missing_ok=True)  # unloadable (e.g. a link that was killed): build it again
                _build(src, build_dir, verbose)
            _state["ops"] = torch.ops.fastsr_ext
            _state["reason"] = None
        except Exception as err:  # a compiler error, a read-only cache, a broken toolchain
            _fail(f"building it failed: {_first_error(err)}; see the whole log with "
                  f"`python -c 'import fastsr.ext as e; e.load_extension(verbose=True)'`", warn=True)
            return None
        return _state["ops"]


def extension_status() -> str:
    """One line: whether the extension is loaded (and from where) or why not."""
    ops = load_extension()
    if ops is not None:
        return f"loaded ({build_directory()})"
    return f"unavailable: {_state['reason']}"


def _reset_for_tests() -> None:
    """Forget the load attempt (the library itself stays loaded), so env vars are re-read."""
    with _lock:
        _state.update(tried=False, ops=None, reason=None, warned=False)
        last_backend.clear()


def backend_used(op: str = "imresize") -> str | None:
    """What ran at the last call of wrapper `op` ("imresize", "sample_patches", "to_uint8_hwc"):
    "cpp", "torch", or None before the first call."""
    return last_backend.get(op)


def _choose(op: str, backend: str, usable: bool, why_not: str):
    """The ops namespace when the C++ op should run, else None; raise if "cpp" was demanded."""
    if backend not in ("auto", "cpp", "torch"):
        raise ValueError(f"{op}: backend must be 'auto', 'cpp' or 'torch', got {backend!r}")
    if backend == "torch":
        return None
    ops = load_extension()
    if ops is not None and usable:
        return ops
    if backend == "cpp":
        reason = why_not if ops is not None else f"the extension is unavailable: {_state['reason']}"
        raise BackendUnavailable(f"{op}: backend='cpp' cannot run: {reason}")
    return None


# ---------------------------------------------------------------------------------------
# imresize
# ---------------------------------------------------------------------------------------


def imresize_fast(img: Tensor, scale: float | None = None, size: tuple[int, int] | None = None,
                  antialias: bool = True, backend: str = "auto") -> Tensor:
    """``fastsr.imresize.imresize`` (same arguments, results, errors), in C++ when possible.

    The C++ op runs for CPU tensors of dtype uint8, float32 or float64 that need no
    gradient; anything else (CUDA, half, autograd) takes the PyTorch version. uint8 results
    equal the PyTorch version's (a pixel could differ by one level only if a pre-rounding
    value fell within ~1e-13 of a .5); float results agree to float rounding.
    """
    from fastsr.imresize import _check_args, imresize

    _check_args(img, scale, size)
    usable = (img.device.type == "cpu" and img.dtype in (torch.uint8, torch.float32, torch.float64)
              and not (img.requires_grad and torch.is_grad_enabled()))
    why_not = f"needs a CPU uint8/float32/float64 tensor without autograd, got {img.dtype} on {img.device}"
    ops = _choose("imresize", backend, usable, why_not)
    if ops is None:
        last_backend["imresize"] = "torch"
        return imresize(img, scale=scale, size=size, antialias=antialias)
    last_backend["imresize"] = "cpp"
    return ops.imresize(img, None if scale is None else float(scale), None if size is None else list(size),
                        bool(antialias))


# ---------------------------------------------------------------------------------------
# Patch sampler
# ---------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _splitmix64_at(seed: int, k: int) -> int:
    """Output k (0-based) of the splitmix64 sequence seeded with `seed` (as csrc/patches.cpp)."""
    z = (seed + (k + 1) * _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def patch_draws(n_images: int, crop_h: Sequence[int], crop_w: Sequence[int], patch_size: int,
                      batch_size: int, seed: int) -> list[tuple[int, int, int, bool, bool, bool]]:
    """The C++ sampler's draws: per sample (image, top, left, hflip, vflip, transpose).

    Sample b takes outputs 4b..4b+3 of splitmix64(seed): image = r0 * N >> 64, top = r1 *
    (crop_h - P + 1) >> 64, left likewise from r2, and bits 63, 62, 61 of r3 for the flags.
    """
    seed &= _MASK64
    out = []
    for b in range(batch_size):
        r = [_splitmix64_at(seed, 4 * b + j) for j in range(4)]
        img = (r[0] * n_images) >> 64
        top = (r[1] * (crop_h[img] - patch_size + 1)) >> 64
        left = (r[2] * (crop_w[img] - patch_size + 1)) >> 64
        out.append((img, top, left, bool(r[3] >> 63 & 1), bool(r[3] >> 62 & 1), bool(r[3] >> 61 & 1)))
    return out


class Patches(NamedTuple):
    """A sampled batch: lr (B, C, P, P) and hr (B, C, sP, sP) float32 0..255; params (B, 6)
    int64 rows (image, top, left, hflip, vflip, transpose), top/left in LR pixels."""

    lr: Tensor
    hr: Tensor
    params: Tensor


def _sample_patches_torch(lr: Sequence[Tensor], hr: Sequence[Tensor], scale: int, patch: int, batch: int,
                          seed: int, layout: str) -> Patches:
    """The reference: the same checks (RuntimeError, same messages), draws and crops as the C++ op."""
    fn = "fastsr_ext::sample_patches: "
    if layout not in ("CHW", "HWC"):
        raise RuntimeError(f'{fn}layout must be "CHW" or "HWC", got "{layout}"')
    if len(lr) == 0:
        raise RuntimeError(f"{fn}needs at least one image, got an empty list")
    if len(lr) != len(hr):
        raise RuntimeError(f"{fn}lr and hr must list the same number of images, got {len(lr)} and {len(hr)}")
    if scale < 1:
        raise RuntimeError(f"{fn}scale must be a positive int, got {scale}")
    if patch < 1:
        raise RuntimeError(f"{fn}patch_size must be positive, got {patch}")
    if batch < 0:
        raise RuntimeError(f"{fn}batch_size must be non-negative, got {batch}")
    chw_l, chw_h, crop_h, crop_w = [], [], [], []
    for i, (a, b) in enumerate(zip(lr, hr)):
        for name, t in (("lr", a), ("hr", b)):
            if t.dtype != torch.uint8:
                raise RuntimeError(f"{fn}{name}[{i}] must be uint8, got {t.dtype}")
            if t.dim() != 3:
                want = "(H, W, C)" if layout == "HWC" else "(C, H, W)"
                raise RuntimeError(f"{fn}{name}[{i}] must have shape {want}, got shape {list(t.shape)}")
        a, b = (a.permute(2, 0, 1), b.permute(2, 0, 1)) if layout == "HWC" else (a, b)
        c0 = chw_l[0].shape[0] if chw_l else a.shape[0]
        if a.shape[0] != c0 or b.shape[0] != c0:
            raise RuntimeError(f"{fn}all images must have the same number of channels ({c0} in lr[0]), got "
                               f'{a.shape[0]} in lr[{i}] and {b.shape[0]} in hr[{i}] (is layout="{layout}" right?)')
        ch, cw = min(a.shape[1], b.shape[1] // scale), min(a.shape[2], b.shape[2] // scale)
        if ch < patch or cw < patch:
            raise RuntimeError(f"{fn}image {i} is too small: lr {a.shape[1]}x{a.shape[2]} with hr "
                               f"{b.shape[1]}x{b.shape[2]} at x{scale} leaves a {ch}x{cw} LR area, smaller than "
                               f"the patch ({patch}x{patch})")
        chw_l.append(a)
        chw_h.append(b)
        crop_h.append(ch)
        crop_w.append(cw)

    c, q = chw_l[0].shape[0], scale * patch
    device = chw_l[0].device
    lr_out = torch.empty(batch, c, patch, patch, device=device)
    hr_out = torch.empty(batch, c, q, q, device=device)
    draws = patch_draws(len(chw_l), crop_h, crop_w, patch, batch, seed)
    for k, (i, top, left, hf, vf, tr) in enumerate(draws):
        lr_out[k].copy_(augment(chw_l[i][:, top: top + patch, left: left + patch], hf, vf, tr))
        hr_p = chw_h[i][:, scale * top: scale * (top + patch), scale * left: scale * (left + patch)]
        hr_out[k].copy_(augment(hr_p, hf, vf, tr))
    params = torch.tensor(draws, dtype=torch.int64).reshape(batch, 6)
    return Patches(lr_out, hr_out, params)


def sample_patches(lr_images: Sequence[Tensor], hr_images: Sequence[Tensor], scale: int, patch_size: int,
                   batch_size: int, seed: int, layout: str = "CHW", backend: str = "auto") -> Patches:
    """A batch of aligned LR/HR patches with random flips and transposes, float32 0..255.

    Args:
        lr_images, hr_images: decoded uint8 images, ``lr_images[i]`` the LR of
            ``hr_images[i]``, each ``(C, H, W)`` (layout "CHW") or ``(H, W, C)`` ("HWC"),
            any strides (views of a packed buffer, e.g. ``ImageStore.image(i)``, are fine).
        scale: the integer SR factor s; the HR crop is the LR crop's ``s x`` partner.
        patch_size: LR patch side P (HR patches are ``s * P``).
        batch_size: patches per batch.
        seed: any int (taken mod 2**64); the batch is a pure function of the arguments. Use
            a different seed per batch, e.g. ``fastsr.data.derive_seed(seed, rank, step)``.

    Returns:
        ``Patches(lr, hr, params)``; both backends return identical tensors.

    Semantics are those of ``fastsr.data.crop_pair``: crop inside ``min(lr, hr // s)``,
    h-flip, then v-flip, then transpose, all shared by the pair.

    Raises:
        RuntimeError: a bad argument or image, with a message naming it (the C++ op's
            TORCH_CHECK, or the same text from the PyTorch path).
    """
    lr_images, hr_images = list(lr_images), list(hr_images)
    usable = all(t.device.type == "cpu" for t in lr_images[:1] + hr_images[:1])
    ops = _choose("sample_patches", backend, usable, "needs CPU images")
    if ops is None:
        last_backend["sample_patches"] = "torch"
        return _sample_patches_torch(lr_images, hr_images, int(scale), int(patch_size), int(batch_size),
                                     int(seed), layout)
    s64 = int(seed) & _MASK64
    s64 = s64 - (1 << 64) if s64 >= 1 << 63 else s64  # the same 64 bits as a signed int64
    last_backend["sample_patches"] = "cpp"
    return Patches(*ops.sample_patches(lr_images, hr_images, int(scale), int(patch_size), int(batch_size), s64,
                                       layout))


# ---------------------------------------------------------------------------------------
# Output path
# ---------------------------------------------------------------------------------------


def to_uint8_hwc(img: Tensor, backend: str = "auto") -> Tensor:
    """Float SR output in 0..255 to a uint8 image for saving, in one pass.

    Args:
        img: ``(N, C, H, W)`` or ``(C, H, W)``, floating, values nominally 0..255.

    Returns:
        ``(N, H, W, C)`` / ``(H, W, C)`` contiguous uint8:
        ``torch.round(img).clamp(0, 255).to(torch.uint8)`` moved channels-last (round half
        to even, like ``torch.round``; NaN becomes 0).
    """
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"to_uint8_hwc: img must be a torch.Tensor, got {type(img).__name__}")
    if img.dim() not in (3, 4):
        raise ValueError(f"to_uint8_hwc: img must have shape (N, C, H, W) or (C, H, W), got shape {tuple(img.shape)}")
    if not img.dtype.is_floating_point:
        raise TypeError(f"to_uint8_hwc: img must be a floating tensor (values 0..255), got {img.dtype}")
    ops = _choose("to_uint8_hwc", backend, img.device.type == "cpu", f"needs a CPU tensor, got {img.device}")
    if ops is not None:
        last_backend["to_uint8_hwc"] = "cpp"
        return ops.to_uint8_hwc(img.detach())
    last_backend["to_uint8_hwc"] = "torch"
    with torch.no_grad():
        x = img.round()
        x.clamp_(0, 255).nan_to_num_(nan=0.0)
        out = x.to(torch.uint8)
    return out.permute(*range(out.dim() - 3), -2, -1, -3).contiguous()
