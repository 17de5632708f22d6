"""What the commands share: the `Command` record, messages, argument types, and the model
arguments (--weights, --model, --device, --tile, ...) with their resolution into an
`fastsr.inference.Upscaler`."""
from __future__ import annotations

import argparse
import contextlib
import inspect
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn as nn

from fastsr.checkpoints import LAYOUTS
from fastsr.errors import FastSRError
from fastsr.inference import Upscaler
from fastsr.models.edsr import MDSR, PRESETS, SUPPORTED_SCALES

PROG = "fastsr"
BICUBIC_WARNING = (
    "WARNING: no trained weights shipped or given (--weights FILE): "
    "this output is plain bicubic, NOT EDSR"
)


class Command(NamedTuple):
    """One subcommand: its help line, what it adds to its parser, and run(args) -> exit status."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------


def error(message: str) -> None:
    """One line `fastsr: error: ...` on stderr, kept clear of a running progress bar."""
    from tqdm import tqdm

    tqdm.write(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)


def info(message: str) -> None:
    """One line `fastsr: ...` on stderr, kept clear of a running progress bar."""
    from tqdm import tqdm

    tqdm.write(f"{PROG}: {message}", file=sys.stderr)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is: whatever a Ctrl-C cleans up (a half-written
    output's temp file, ...) is cleaned up the same way."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside: SIGTERM raises Terminated in the main thread (elsewhere: left as it is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        raise Terminated()

    old = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# ---------------------------------------------------------------------------------------
# Argument types (argparse turns ArgumentTypeError into a usage error, exit 2)
# ---------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def tile_arg(text: str) -> int | str:
    """argparse type of --tile: 'auto' or a positive integer."""
    return "auto" if text == "auto" else positive_int(text)


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


def size_arg(text: str) -> int:
    """argparse type: `parse_size`."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def device_arg(text: str) -> str:
    """argparse type of --device: cpu, cuda, cuda:N or auto."""
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or auto, got {text!r}")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments `load_upscaler` reads: --scale, --weights/--bicubic, --layout, --model,
    --device, --half, --backend, --tile, --tile-overlap, --self-ensemble."""
    p.add_argument("--scale", "-s", type=int, choices=SUPPORTED_SCALES,
                   help="upscaling factor (default: the --weights file's own scale; required without --weights "
                        "and for MDSR files, which hold several)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--weights", "-w", metavar="WEIGHTS",
                       help="a checkpoint file (official EDSR/MDSR .pt, BasicSR .pth, fastsr .safetensors), "
                            "'default' (the shipped EDSR-baseline files; also what runs without --weights), "
                            "'official' (the EDSR-PyTorch release for --model and --scale, downloaded once into "
                            "torch.hub's cache and hash-checked), or hf://OWNER/REPO[/FILE] (needs fastsr[hub])")
    which.add_argument("--bicubic", action="store_true", help="plain MATLAB-style bicubic instead of a network")
    p.add_argument("--layout", choices=LAYOUTS, default="auto",
                   help="how --weights is laid out: auto (official, BasicSR or fastsr, told by key names; "
                        "default), or name it; super-image's EDSR files have the official key names but no "
                        "mean shift and 0..1 input, so they must be named")
    p.add_argument("--model", choices=sorted(PRESETS), metavar="PRESET",
                   help=f"network preset ({', '.join(sorted(PRESETS))}); with --weights, the file must hold it; "
                        "without, selects the shipped weights (only edsr_baseline ships)")
    p.add_argument("--device", type=device_arg, default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--half", action="store_true",
                   help="half-precision features (bfloat16 on CPU, float16 on CUDA); the image stays fp32 in and out")
    p.add_argument("--backend", choices=("auto", "eager", "triton", "cpu", "reference"), default="auto",
                   help="how the network runs: auto = fastsr's fused path with the best backend for the device "
                        "(default); eager = the official PyTorch modules; or force a fused backend by name")
    p.add_argument("--tile", type=tile_arg, default="auto", metavar="N|auto",
                   help="process the LR image in N x N tiles; auto (default): tiles when the whole image would "
                        "not fit in the memory found, or on the CPU (at most 15%% more work) to show progress on "
                        "a big one")
    p.add_argument("--tile-overlap", type=non_negative_int, metavar="N",
                   help="LR context pixels per tile side (default: the receptive-field radius, "
                        "which makes tiled output identical to untiled; smaller is faster but not exact)")
    p.add_argument("--self-ensemble", action="store_true",
                   help="average the 8 flips/rotations (the paper's EDSR+; 8x slower)")


# ---------------------------------------------------------------------------------------
# Model selection
# ---------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    """--device text -> torch.device; FastSRError when CUDA (or that index) is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FastSRError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise FastSRError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


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


def weights_file(spec: str, preset: str | None, scale: int | None) -> Path:
    """--weights text -> a local file (fastsr.weights.resolve_weights). The words "default"
    and "official" name the file by the preset's architecture (default edsr_baseline) at
    `scale`, which EDSR presets need."""
    from fastsr.weights import WEIGHT_WORDS, resolve_weights

    if spec not in WEIGHT_WORDS:
        return resolve_weights(spec)
    preset = preset or "edsr_baseline"
    if scale is None and "scale" in inspect.signature(PRESETS[preset]).parameters:
        raise FastSRError(f"--weights {spec} needs --scale (the file is chosen by --model and scale)")
    return resolve_weights(spec, _preset_reference(preset, scale).arch)


def load_upscaler(args: argparse.Namespace) -> Upscaler:
    """Resolve --weights / --model / --scale / --bicubic / --device / --half into an Upscaler.

    Never random weights: without --weights and without shipped weights it is bicubic,
    with BICUBIC_WARNING on stderr. Without --scale, a --weights file's own scale is used.
    """
    from fastsr.checkpoints import model_arch_tag, model_from_checkpoint
    from fastsr.weights import default_weights

    scale = args.scale
    device = pick_device(args.device)
    spec = args.weights
    if scale is None and args.bicubic:
        raise FastSRError("--bicubic needs --scale")
    if scale is None and spec is None:
        raise FastSRError("--scale is required without --weights (the shipped EDSR-baseline weights are x2, x3, x4)")

    def upscaler(model: nn.Module | None, label: str, dtype: torch.dtype, at: int) -> Upscaler:
        return Upscaler(model, label, dtype=dtype, device=device, scale=at, tile=args.tile,
                        tile_overlap=args.tile_overlap, self_ensemble=args.self_ensemble)

    if args.bicubic:
        return upscaler(None, "bicubic", torch.float32, scale)
    if spec is None:
        if args.model not in (None, "edsr_baseline"):
            raise FastSRError(f"no weights ship for --model {args.model}; pass --weights official or a file")
        weights = default_weights(scale)
        if weights is None:
            info(BICUBIC_WARNING)
            return upscaler(None, "bicubic (no weights)", torch.float32, scale)
    else:
        weights = weights_file(spec, args.model, scale)
    half = (torch.float16 if device.type == "cuda" else torch.bfloat16) if args.half else None
    backend = getattr(args, "backend", "auto")
    if backend == "eager":
        model = model_from_checkpoint(weights, layout=args.layout)
        dtype = half or torch.float32
    else:  # the fused path computes in `half` internally and keeps fp32 pixels in and out
        model = model_from_checkpoint(weights, layout=args.layout, fused=True,
                                      backend=None if backend == "auto" else backend, dtype=half)
        dtype = torch.float32
    if scale is None:
        if isinstance(model, MDSR):
            raise FastSRError(f"{weights} is an MDSR with scales {', '.join(map(str, model.scales))}: pass --scale")
        scale = model.scale
    _check_model(model, str(weights), scale, args.model)
    model = model.to(device=device, dtype=dtype).eval()
    label = f"{model_arch_tag(model)} from {weights}, {'eager' if backend == 'eager' else 'fused'}"
    return upscaler(model, label, dtype, scale)


def protocol_upscale(up: Upscaler) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 LR (1, 3, h, w) -> quantized SR float 0..255, as the papers' protocol wants
    (`fastsr.evaluation.evaluate_image`'s sr_fn)."""
    from fastsr.metrics import quantize

    if up.model is None:
        return lambda lr: up(lr).float()  # MATLAB's uint8 bicubic: already on the 256 levels
    return lambda lr: quantize(up(lr.float()))


def describe(up: Upscaler) -> str:
    """'x2 with <weights> (cpu, float32, tile 256)': what a run announces."""
    extras = [str(up.device), str(up.compute_dtype).replace("torch.", "")]
    if up.self_ensemble:
        extras.append("self-ensemble")
    if isinstance(up.tile, int):
        extras.append(f"tile {up.tile}")
    return f"x{up.scale} with {up.label} ({', '.join(extras)})"
