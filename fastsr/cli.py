"""The `fastsr` command line: `fastsr upscale ...` and `fastsr eval ...`.

Subcommands live in `COMMANDS` (name -> Command(help, add_arguments, run)); another
module adds one by adding an entry there. `run(args)` returns the exit status.

Exit status: 0 all good; 1 a user-level failure (bad weights, unreadable image, ...:
one line `fastsr: error: ...` on stderr, other files still processed); 2 usage errors
(argparse); 130 interrupted. Anything else that escapes is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn as nn

from fastsr.checkpoints import LAYOUTS
from fastsr.errors import FastSRError
from fastsr.models.edsr import MDSR, PRESETS, SUPPORTED_SCALES

PROG = "fastsr"
BICUBIC_WARNING = (
    "WARNING: no trained weights shipped or given (--weights FILE): "
    "this output is plain bicubic, NOT EDSR"
)


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------


def _error(message: str) -> None:
    """One line on stderr, kept clear of a running progress bar."""
    from tqdm import tqdm

    tqdm.write(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)


def _info(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"{PROG}: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------
# Argument types (argparse turns ArgumentTypeError into a usage error, exit 2)
# ---------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _tile_arg(text: str) -> int | str:
    return "auto" if text == "auto" else _positive_int(text)


# K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024; kB/MB/GB/TB powers of 1000 (any case).
_SIZE_UNITS = {"": 1, "b": 1, **{p: 1024 ** (i + 1) for i, p in enumerate("kmgt")},
               **{p + "ib": 1024 ** (i + 1) for i, p in enumerate("kmgt")},
               **{p + "b": 1000 ** (i + 1) for i, p in enumerate("kmgt")}}


def parse_size(text: str) -> int:
    """'2GiB', '1.5G', '800MB', '512m', '1073741824' -> bytes; ValueError for anything else."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", text)
    if m is None or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"expected a size such as 2GiB, 1.5G, 800MB or 800M "
                         f"(K/M/G/KiB/MiB/GiB: powers of 1024; kB/MB/GB: of 1000), got {text!r}")
    value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"expected a positive size such as 2GiB or 800M, got {text!r}")
    return value


def format_size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _device_arg(text: str) -> str:
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or auto, got {text!r}")


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scale", "-s", type=int, required=True, choices=SUPPORTED_SCALES, help="upscaling factor")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--weights", "-w", metavar="FILE",
                       help="checkpoint: official EDSR/MDSR .pt, BasicSR .pth or fastsr .safetensors")
    which.add_argument("--bicubic", action="store_true", help="plain MATLAB-style bicubic instead of a network")
    p.add_argument("--layout", choices=LAYOUTS, default="auto",
                   help="how --weights is laid out: auto (official, BasicSR or fastsr, told by key names; "
                        "default), or name it; super-image's EDSR files have the official key names but no "
                        "mean shift and 0..1 input, so they must be named")
    p.add_argument("--model", choices=sorted(PRESETS), metavar="PRESET",
                   help=f"network preset ({', '.join(sorted(PRESETS))}); with --weights, the file must hold it; "
                        "without, selects the shipped weights (only edsr_baseline ships)")
    p.add_argument("--device", type=_device_arg, default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--half", action="store_true",
                   help="half-precision features (bfloat16 on CPU, float16 on CUDA); the image stays fp32 in and out")
    p.add_argument("--backend", choices=("auto", "eager", "triton", "cpu", "reference"), default="auto",
                   help="how the network runs: auto = fastsr's fused path with the best backend for the device "
                        "(default); eager = the official PyTorch modules; or force a fused backend by name")
    p.add_argument("--tile", type=_tile_arg, metavar="N|auto",
                   help="process the LR image in N x N tiles (or 'auto': only when it would not fit in memory)")
    p.add_argument("--tile-overlap", type=_non_negative_int, metavar="N",
                   help="LR context pixels per tile side (default: the receptive-field radius, "
                        "which makes tiled output identical to untiled; smaller is faster but not exact)")
    p.add_argument("--self-ensemble", action="store_true",
                   help="average the 8 flips/rotations (the paper's EDSR+; 8x slower)")


# ---------------------------------------------------------------------------------------
# Model selection
# ---------------------------------------------------------------------------------------


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FastSRError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise FastSRError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


@dataclass
class Upscaler:
    """The chosen way to upscale: a loaded network, or bicubic (model None)."""

    model: nn.Module | None
    label: str
    device: torch.device
    dtype: torch.dtype
    scale: int
    tile: int | str | None = None
    tile_overlap: int | None = None
    self_ensemble: bool = False

    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        """lr (N, 3, H, W) float 0..255 (uint8 for the bicubic protocol path) -> float32 CPU output."""
        return self.run(lr, self.tile)

    def run(self, lr: torch.Tensor, tile: int | str | None) -> torch.Tensor:
        """As __call__, with this tiling instead of self.tile (None: the whole input at once)."""
        from fastsr.inference import bicubic_upscale, upscale

        if self.model is None:
            return bicubic_upscale(lr.to(self.device), self.scale).float().cpu()
        x = lr.to(self.device, self.dtype)
        y = upscale(self.model, x, self.scale, tile=tile, tile_overlap=self.tile_overlap,
                    self_ensemble=self.self_ensemble)
        return y.float().cpu()

    @property
    def context(self) -> int:
        """LR context pixels per tile side: --tile-overlap, else what makes tiles exact (the
        network's receptive-field radius; bicubic reads 2 pixels beyond, alpha too)."""
        from fastsr.inference import receptive_field_radius

        if self.tile_overlap is not None:
            return self.tile_overlap
        return max(3, receptive_field_radius(self.model, self.scale)) if self.model is not None else 3

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _preset_reference(name: str, scale: int) -> nn.Module:
    factory = PRESETS[name]
    # Built on the meta device: only the shapes are needed, not 40M real parameters.
    with torch.device("meta"):
        return factory(scale) if "scale" in inspect.signature(factory).parameters else factory()


def _check_model(model: nn.Module, source: str, scale: int, preset: str | None) -> None:
    from fastsr.checkpoints import model_arch_tag

    if preset is not None:
        ref = _preset_reference(preset, scale)
        if type(ref) is not type(model) or (ref.n_resblocks, ref.n_feats) != (model.n_resblocks, model.n_feats):
            raise FastSRError(f"{source} holds {model_arch_tag(model)}, not --model {preset} ({model_arch_tag(ref)})")
    if isinstance(model, MDSR):
        if scale not in model.scales:
            raise FastSRError(f"{source}: this MDSR has scales {model.scales}, not --scale {scale}")
    elif model.scale != scale:
        raise FastSRError(
            f"{source} is an x{model.scale} model ({model_arch_tag(model)}), but --scale is {scale}; "
            f"use weights trained for x{scale}"
        )


def load_upscaler(args: argparse.Namespace) -> Upscaler:
    """Resolve --weights / --model / --bicubic / --device / --half into an Upscaler.

    Never random weights: without --weights and without shipped weights it is bicubic,
    with BICUBIC_WARNING on stderr.
    """
    from fastsr.checkpoints import model_arch_tag, model_from_checkpoint
    from fastsr.weights import default_weights

    scale = args.scale
    device = _pick_device(args.device)
    common = dict(device=device, scale=scale, tile=args.tile, tile_overlap=args.tile_overlap,
                  self_ensemble=args.self_ensemble)
    if args.bicubic:
        return Upscaler(None, "bicubic", dtype=torch.float32, **common)
    weights = Path(args.weights) if args.weights else None
    if weights is None:
        if args.model not in (None, "edsr_baseline"):
            raise FastSRError(f"no weights ship for --model {args.model}; pass --weights FILE")
        weights = default_weights(scale)
        if weights is None:
            _info(BICUBIC_WARNING)
            return Upscaler(None, "bicubic (no weights)", dtype=torch.float32, **common)
    half = (torch.float16 if device.type == "cuda" else torch.bfloat16) if args.half else None
    backend = getattr(args, "backend", "auto")
    if backend == "eager":
        model = model_from_checkpoint(weights, layout=args.layout)
        dtype = half or torch.float32
    else:  # the fused path computes in `half` internally and keeps fp32 pixels in and out
        model = model_from_checkpoint(weights, layout=args.layout, fused=True,
                                      backend=None if backend == "auto" else backend, dtype=half)
        dtype = torch.float32
    _check_model(model, str(weights), scale, args.model)
    model = model.to(device=device, dtype=dtype).eval()
    label = f"{model_arch_tag(model)} from {weights}, {'eager' if backend == 'eager' else 'fused'}"
    return Upscaler(model, label, dtype=dtype, **common)


def _describe(up: Upscaler) -> str:
    compute = getattr(up.model, "compute_dtype", None) or up.dtype
    extras = [str(up.device), str(compute).replace("torch.", "")]
    if up.self_ensemble:
        extras.append("self-ensemble")
    if up.tile is not None:
        extras.append(f"tile {up.tile}")
    return f"x{up.scale} with {up.label} ({', '.join(extras)})"


_OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})


def _is_cpu_oom(err: RuntimeError) -> bool:
    return "can't allocate memory" in str(err) or "not enough memory" in str(err)


def _run_guarded(up: Upscaler, lr: torch.Tensor, name: str) -> torch.Tensor:
    """Run the upscaler on one tile (the caller tiles); out-of-memory becomes a one-line
    FastSRError suggesting --tile."""
    try:
        return up.run(lr, None)
    except (*_OOM_ERRORS, RuntimeError) as e:
        if not isinstance(e, _OOM_ERRORS) and not _is_cpu_oom(e):
            raise
        if up.device.type == "cuda":
            torch.cuda.empty_cache()
        h, w = lr.shape[-2:]
        hint = "try a smaller --tile" if up.tile is not None else "try --max-memory SIZE, --tile auto or --tile 256"
        raise FastSRError(f"{name}: out of memory on {up.device} for a {w}x{h} input; {hint}") from None


def _check_memory_floor(up: Upscaler, limit: int) -> None:
    """Run a tiny input once, so that what the first call loads (the fused path imports its
    kernels' modules: ~160 MB resident) is part of the baseline; refuse a bound below it."""
    up.run(torch.zeros(1, 3, 8, 8), None)
    base = _resident_now()
    if base >= limit:
        raise FastSRError(f"--max-memory {format_size(limit)} is below what this process holds with the model "
                          f"loaded ({format_size(base)}) before any image; raise it")


# ---------------------------------------------------------------------------------------
# fastsr upscale
# ---------------------------------------------------------------------------------------


def _add_upscale_arguments(p: argparse.ArgumentParser) -> None:
    from fastsr.imageio import DEFAULT_MAX_PIXELS

    p.add_argument("inputs", nargs="+", metavar="IN", help="image files and/or folders (not recursive)")
    p.add_argument("--output", "-o", required=True, metavar="OUT", help="output folder: OUT/<stem>_x<S>.png")
    _add_model_arguments(p)
    p.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"refuse inputs with more pixels, checked before decoding (default {DEFAULT_MAX_PIXELS:,})")
    p.add_argument("--max-memory", type=_size_arg, metavar="SIZE",
                   help="keep the process's peak resident memory under SIZE (e.g. 2GiB, 1500MB): picks the tile "
                        "size from it; an image that cannot fit is refused before it is decoded")
    p.add_argument("--skip-existing", action="store_true",
                   help="skip inputs whose output PNG exists (outputs are written atomically, so one that "
                        "exists is complete): resumes an interrupted run")


def _collect_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[str]]:
    from fastsr.imageio import IMAGE_EXTENSIONS, list_images

    paths: list[Path] = []
    errors: list[str] = []
    for item in inputs:
        found = list_images([item])
        if Path(item).is_dir() and not found:
            errors.append(f"{item}: folder holds no image files ({' '.join(IMAGE_EXTENSIONS)})")
        paths += [p for p in found if p not in paths]
    return paths, errors


def _header_shape(path: Path) -> tuple[tuple[int, int, int], int] | None:
    """((H, W, channels), bit depth) from the file's header, at worst a guess; None when the
    header is unreadable (the decode that follows says why)."""
    from fastsr.imageio import _DECODE_ERRORS, _open_lazily

    try:
        with _open_lazily(path) as im:
            deep = im.mode.startswith("I") or any(";16" in str(t[3]) for t in im.tile if len(t) > 3)
            alpha = im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info
            return (im.size[1], im.size[0], 4 if alpha else 3), 16 if deep else 8
    except _DECODE_ERRORS:
        return None


def _crop_upscaler(up: Upscaler, bit_depth: int, name: str) -> Callable[[np.ndarray], torch.Tensor]:
    """crop (h, w, C) samples -> (3 or 4, s*h, s*w) float32: the network on RGB, bicubic on alpha."""
    from fastsr.imresize import imresize

    def run(crop: np.ndarray) -> torch.Tensor:
        data = torch.from_numpy(crop.astype(np.float32)).permute(2, 0, 1)
        if bit_depth == 16:
            data = data * (255.0 / 65535.0)  # as read_image
        channels = data.shape[0]
        rgb = data[:1].expand(3, -1, -1) if channels in (1, 2) else data[:3]
        sr = _run_guarded(up, rgb.contiguous()[None], name)[0]
        if channels in (2, 4):
            # Alpha is not something the network was trained on: plain bicubic, clamped.
            alpha = imresize(data[-1].contiguous(), scale=up.scale).clamp_(0, 255)
            sr = torch.cat([sr, alpha[None]])
        return sr

    return run


def _resident_now() -> int:
    from fastsr.inference import resident_bytes

    now = resident_bytes()
    if now is None:  # no /proc: the peak so far (kB on Linux and BSD, bytes on macOS)
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        now = peak if sys.platform == "darwin" else peak * 1024
    return now


def _choose_tile(up: Upscaler, name: str, shape: tuple[int, int, int], bit_depth: int,
                 limit: int | None, base: int, announce: bool = True) -> int | None:
    """The LR tile for one image: --tile, or from --max-memory (limit; base: what the process
    holds before this image), or whole. FastSRError when the bound cannot be kept."""
    from fastsr.inference import auto_tile_size, tile_for_memory, upscale_peak_bytes

    h, w, channels = shape
    if limit is None:
        if up.tile != "auto":
            return up.tile
        if up.model is None:
            return None
        return auto_tile_size(up.model, up.device, up.dtype, lr_size=(h, w), scale=up.scale,
                              tile_overlap=up.tile_overlap)

    def peak(tile: int | None) -> int:
        return base + upscale_peak_bytes(
            up.model, (h, w), channels, bit_depth, up.scale, tile, up.context,
            dtype=getattr(up.model, "compute_dtype", None) or up.dtype,
            on_cpu=up.device.type == "cpu", self_ensemble=up.self_ensemble)

    fixed = isinstance(up.tile, int)
    tile = up.tile if fixed else tile_for_memory(limit, peak, (h, w))
    if peak(tile) > limit:
        how = f"with --tile {tile}" if fixed else "even in small tiles"
        raise FastSRError(
            f"{name}: {w}x{h} at x{up.scale} needs about {format_size(peak(tile))} {how} "
            f"(this process already holds {format_size(base)}), over --max-memory {format_size(limit)}; "
            f"raise --max-memory{' or lower --tile' if fixed else ''}"
        )
    if announce and tile is not None and tile < max(h, w):
        _info(f"{name}: {tile}x{tile} tiles for --max-memory {format_size(limit)} (estimated peak {format_size(peak(tile))})")
    return tile


def _upscale_file(up: Upscaler, path: Path, target: Path, args: argparse.Namespace) -> None:
    """Decode, upscale tile by tile and stream the PNG out; FastSRError / OSError on failure.

    Peak memory: the decoded samples, one band of output rows and one tile's work (see
    `fastsr.inference.upscale_peak_bytes`); with --max-memory the tile comes from the bound,
    and the bound is checked from the header before decoding.
    """
    from fastsr.atomic import remove_stale_temps
    from fastsr.imageio import read_pixels
    from fastsr.inference import upscale_rows
    from fastsr.pngstream import write_png_rows

    limit = args.max_memory
    base = _resident_now() if limit is not None else 0
    header = _header_shape(path) if limit is not None else None
    if header is not None and header[0][0] * header[0][1] <= args.max_pixels:  # else: read_pixels refuses
        _choose_tile(up, str(path), *header, limit, base, announce=False)  # refuses before decoding
    pixels, bit_depth = read_pixels(path, args.max_pixels)
    tile = _choose_tile(up, str(path), pixels.shape, bit_depth, limit, base)
    h, w, channels = pixels.shape
    rows = upscale_rows(_crop_upscaler(up, bit_depth, str(path)), pixels, up.scale, tile, up.context, bit_depth)
    bands = math.ceil(h / tile) if tile else 1
    if bands > 1:  # a tiled image takes a while on its own: a bar over its bands of tiles
        from tqdm import tqdm

        rows = tqdm(rows, total=bands, desc=path.name, unit="band", leave=False, disable=None, file=sys.stderr)
    remove_stale_temps(target)  # left by a killed earlier run
    write_png_rows(target, rows, w * up.scale, h * up.scale, 4 if channels in (2, 4) else 3, bit_depth)


def run_upscale(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise FastSRError(f"{out_dir}: exists and is not a folder (-o/--output names a folder)")
    paths, errors = _collect_inputs(args.inputs)
    for message in errors:
        _error(message)
    failures = len(errors)

    # Two inputs with the same stem (a.png, a.jpg, or two folders) would overwrite each other.
    targets: dict[Path, Path] = {}
    jobs: list[tuple[Path, Path]] = []
    for path in paths:
        target = out_dir / f"{path.stem}_x{args.scale}.png"
        if target in targets:
            _error(f"{path}: skipped, its output {target} would overwrite the output of {targets[target]}")
            failures += 1
            continue
        targets[target] = path
        jobs.append((path, target))
    if not jobs:
        raise FastSRError("no input images to upscale")
    skipped = 0
    if args.skip_existing:
        todo = [(path, target) for path, target in jobs if not target.exists()]
        skipped = len(jobs) - len(todo)
        if skipped:
            _info(f"skipping {skipped} image(s) whose output exists (--skip-existing)")
        jobs = todo
        if not jobs:
            return 1 if failures else 0

    up = load_upscaler(args)
    _info(f"upscaling {len(jobs)} image(s) {_describe(up)} into {out_dir}")
    if args.max_memory is not None:
        _check_memory_floor(up, args.max_memory)
    done = 0
    for path, target in tqdm(jobs, desc=PROG, unit="img", disable=None, file=sys.stderr):
        try:
            _upscale_file(up, path, target, args)
        except FastSRError as e:
            _error(str(e))
            failures += 1
            continue
        except OSError as e:
            _error(f"{target}: cannot write ({e.strerror or e})")
            failures += 1
            continue
        done += 1
    _info(f"wrote {done} of {len(jobs)} image(s) to {out_dir}" + (f"; {failures} problem(s) reported" if failures else ""))
    if up.model is None and up.label != "bicubic":
        _info(BICUBIC_WARNING)
    return 1 if failures else 0


# ---------------------------------------------------------------------------------------
# fastsr eval
# ---------------------------------------------------------------------------------------


def _add_eval_arguments(p: argparse.ArgumentParser) -> None:
    from fastsr.evaluation import PROTOCOLS

    p.add_argument("datasets", nargs="+", metavar="DATASET_DIR", help="folders of HR images (e.g. Set5 Set14)")
    _add_model_arguments(p)
    # eval takes several scales (--scale 2 3 4): one table, datasets by scales.
    for action in p._actions:
        if action.dest == "scale":
            action.nargs, action.help = "+", "upscaling factor(s), e.g. --scale 2 3 4"
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="paper",
                   help="paper (default: Y, shave = scale, gray images on their own channel, as the published "
                        "tables), official (the EDSR-PyTorch code: gray copied to RGB), div2k (RGB, shave = scale + 6)")
    p.add_argument("--per-image", action="store_true", help="also print one table per dataset and scale")
    p.add_argument("--save-images", metavar="DIR",
                   help="write each SR image as DIR/<dataset>/x<scale>/<name>.png")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")


def _sr_function(up: Upscaler):
    """uint8 LR (1, 3, h, w) -> quantized SR float 0..255, as the protocol wants."""
    from fastsr.metrics import quantize

    if up.model is None:
        return lambda lr: up(lr).float()  # MATLAB's uint8 bicubic: already on the 256 levels
    return lambda lr: quantize(up(lr.float()))


def run_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from fastsr.evaluation import evaluate_image, get_protocol, summarize
    from fastsr.imageio import list_images, read_image, write_png

    protocol = get_protocol(args.protocol)
    scales = list(dict.fromkeys(args.scale))  # in the order given, once each
    datasets = []
    for d in args.datasets:
        folder = Path(d)
        if not folder.is_dir():
            raise FastSRError(f"{folder}: not a folder of images")
        paths = list_images([folder])
        if not paths:
            raise FastSRError(f"{folder}: no image files in this folder")
        datasets.append((folder, paths))
    upscalers = {s: load_upscaler(argparse.Namespace(**{**vars(args), "scale": s})) for s in scales}
    images = {}  # decoded once, reused for every scale
    results = []
    start = time.perf_counter()
    n_total = sum(len(p) for _, p in datasets) * len(scales)
    bar = tqdm(total=n_total, desc=PROG, unit="img", disable=None, file=sys.stderr, leave=False)
    for s in scales:
        up = upscalers[s]
        _info(f"evaluating {', '.join(str(f) for f, _ in datasets)} {_describe(up)}, protocol {protocol.name}")
        sr_fn = _sr_function(up)
        for folder, paths in datasets:
            rows, failed = [], []
            for path in paths:
                bar.update(1)
                try:
                    if path not in images:
                        images[path] = read_image(path)
                    image = images[path]
                    row = evaluate_image(sr_fn, image.rgb, s, protocol, gray=image.gray, name=path.name,
                                         keep_sr=bool(args.save_images), synchronize=up.synchronize)
                except FastSRError as e:
                    # evaluate_image names the image by path.name; the report names the file.
                    text = str(e)
                    message = text if text.startswith(str(path)) else f"{path}: {text.removeprefix(path.name + ': ')}"
                    _error(message)
                    failed.append(message)
                    continue
                if args.save_images:
                    target = Path(args.save_images) / folder.name / f"x{s}" / f"{path.stem}.png"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    write_png(target, row.sr)
                    row.sr = None
                rows.append(row)
            results.append(summarize(folder.name, s, rows, failed))
    bar.close()
    total = time.perf_counter() - start
    first = upscalers[scales[0]]
    mode = {"weights": first.label, "self_ensemble": first.self_ensemble,
            "dtype": str(getattr(first.model, "compute_dtype", None) or first.dtype).replace("torch.", ""),
            "device": str(first.device)}
    if args.json:
        print(json.dumps({"protocol": protocol.name, "protocol_description": protocol.description, **mode,
                          "scales": scales, "results": [r.as_dict() for r in results], "seconds": total}, indent=2))
    else:
        if args.per_image:
            for r in results:
                _print_image_table(r)
        _print_summary(results, scales, protocol, mode, total)
    if any(up.model is None and up.label != "bicubic" for up in upscalers.values()):
        _info(BICUBIC_WARNING)
    return 1 if any(r.failed or not r.images for r in results) else 0


def _print_image_table(r) -> None:
    width = max([len("image")] + [len(im.name) for im in r.images])
    print(f"{r.dataset} x{r.scale}")
    print(f"{'image':<{width}}  {'size':>9}  {'PSNR (dB)':>9}  {'SSIM':>6}  {'time (s)':>8}")
    for im in r.images:
        size = f"{im.width}x{im.height}"
        print(f"{im.name:<{width}}  {size:>9}  {im.psnr:>9.4f}  {im.ssim:>6.4f}  {im.seconds:>8.3f}")
    print()


def _print_summary(results, scales: list[int], protocol, mode: dict, total: float) -> None:
    """One paper-style table: a row per dataset, PSNR / SSIM per scale; the mode below it."""
    by = {(r.dataset, r.scale): r for r in results}
    names = list(dict.fromkeys(r.dataset for r in results))
    width = max([len("dataset")] + [len(n) for n in names])
    print(f"{'dataset':<{width}}  " + "  ".join(f"{'x' + str(s) + ' PSNR / SSIM':>18}" for s in scales))
    notes = []
    for n in names:
        cells = []
        for s in scales:
            r = by[(n, s)]
            cells.append(f"{r.psnr:>8.2f} / {r.ssim:.4f}" if r.images else f"{'-':>18}")
            if r.infinite:
                notes.append(f"{n} x{s}: {', '.join(r.infinite)} identical to HR (infinite PSNR), "
                             "left out of the PSNR mean")
            if r.failed:
                notes.append(f"{n} x{s}: {len(r.failed)} image(s) not scored (see above)")
        print(f"{n:<{width}}  " + "  ".join(f"{c:>18}" for c in cells))
    for note in notes:
        print(f"note: {note}")
    print(f"protocol {protocol.name}: {protocol.description}; {mode['weights']}"
          f"{', self-ensemble (EDSR+)' if mode['self_ensemble'] else ''}; {mode['dtype']} on {mode['device']}; "
          f"total {total:.2f} s")


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------

COMMANDS: dict[str, Command] = {
    "upscale": Command("super-resolve images or folders into PNGs", _add_upscale_arguments, run_upscale),
    "eval": Command("PSNR/SSIM of a folder of HR images under the papers' protocol", _add_eval_arguments, run_eval),
    "train": Command("train EDSR/MDSR with the paper's recipe (config file + overrides)",
                     lambda p: _train().add_arguments(p), lambda args: _train().run_cli(args)),
}


def _train():
    # Imported on use: training pulls in the optimizer stack, which upscale/eval never need.
    from fastsr import train

    return train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="EDSR/MDSR super-resolution (official-checkpoint compatible)."
    )
    from fastsr import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: argparse already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if getattr(args, "run", None) is None:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: a command is required ({', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            # Library warnings (a guessed res_scale, ...) as one line each, not file:line text.
            warnings.showwarning = lambda message, *rest: _info(f"warning: {message}")
            return args.run(args)
    except FastSRError as e:
        _error(str(e))
        return 1
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
