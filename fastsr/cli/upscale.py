"""`fastsr upscale IN... -o OUT`: images and folders into OUT/<stem>_x<S>.png, streamed
tile by tile, within --max-memory when given."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from fastsr.cli.common import (
    BICUBIC_WARNING, PROG, Command, add_model_arguments, describe, error, info, load_upscaler,
    positive_int, size_arg,
)
from fastsr.errors import FastSRError
from fastsr import inference
from fastsr.inference import Upscaler, format_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The upscale command's arguments."""
    from fastsr.imageio import DEFAULT_MAX_PIXELS

    p.add_argument("inputs", nargs="+", metavar="IN", help="image files and/or folders (not recursive)")
    p.add_argument("--output", "-o", required=True, metavar="OUT", help="output folder: OUT/<stem>_x<S>.png")
    add_model_arguments(p)
    p.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"refuse inputs with more pixels, checked before decoding (default {DEFAULT_MAX_PIXELS:,})")
    p.add_argument("--max-memory", type=size_arg, metavar="SIZE",
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


def _crop_upscaler(up: Upscaler, bit_depth: int, name: str) -> Callable[[np.ndarray], torch.Tensor]:
    """crop (h, w, C) samples -> (3 or 4, s*h, s*w) float32: the network on RGB, bicubic on alpha."""
    from fastsr.imresize import imresize

    def run(crop: np.ndarray) -> torch.Tensor:
        data = torch.from_numpy(crop.astype(np.float32)).permute(2, 0, 1)
        if bit_depth == 16:
            data = data * (255.0 / 65535.0)  # as read_image
        channels = data.shape[0]
        rgb = data[:1].expand(3, -1, -1) if channels in (1, 2) else data[:3]
        sr = up.run_guarded(rgb.contiguous()[None], name)[0]
        if channels in (2, 4):
            # Alpha is not something the network was trained on: plain bicubic, clamped.
            alpha = imresize(data[-1].contiguous(), scale=up.scale).clamp_(0, 255)
            sr = torch.cat([sr, alpha[None]])
        return sr

    return run


def _upscale_file(up: Upscaler, path: Path, target: Path, args: argparse.Namespace) -> None:
    """Decode, upscale tile by tile and stream the PNG out; FastSRError / OSError on failure.

    Peak memory: the decoded samples, one band of output rows and one tile's work (see
    `fastsr.inference.upscale_peak_bytes`); with --max-memory the tile comes from the bound,
    and the bound is checked from the header before decoding.
    """
    from fastsr.atomic import remove_stale_temps
    from fastsr.imageio import read_header, read_pixels
    from fastsr.inference import upscale_rows
    from fastsr.pngstream import write_png_rows

    limit = args.max_memory
    base = inference.process_memory_bytes() if limit is not None else 0
    header = read_header(path) if limit is not None else None
    if header is not None and header[0][0] * header[0][1] <= args.max_pixels:  # else: read_pixels refuses
        up.choose_tile(str(path), *header, limit, base)  # refuses before decoding
    pixels, bit_depth = read_pixels(path, args.max_pixels)
    tile, peak = up.choose_tile(str(path), pixels.shape, bit_depth, limit, base)
    h, w, channels = pixels.shape
    if peak is not None and tile is not None and tile < max(h, w):
        info(f"{path}: {tile}x{tile} tiles for --max-memory {format_size(limit)} (estimated peak {format_size(peak)})")
    rows = upscale_rows(_crop_upscaler(up, bit_depth, str(path)), pixels, up.scale, tile, up.context, bit_depth)
    bands = math.ceil(h / tile) if tile else 1
    if bands > 1:  # a tiled image takes a while on its own: a bar over its bands of tiles
        from tqdm import tqdm

        rows = tqdm(rows, total=bands, desc=path.name, unit="band", leave=False, disable=None, file=sys.stderr)
    remove_stale_temps(target)  # left by a killed earlier run
    write_png_rows(target, rows, w * up.scale, h * up.scale, 4 if channels in (2, 4) else 3, bit_depth)


def run(args: argparse.Namespace) -> int:
    """Upscale every input; exit status 1 when any input or output had a problem."""
    from tqdm import tqdm

    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise FastSRError(f"{out_dir}: exists and is not a folder (-o/--output names a folder)")
    paths, errors = _collect_inputs(args.inputs)
    for message in errors:
        error(message)
    failures = len(errors)

    # Two inputs with the same stem (a.png, a.jpg, or two folders) would overwrite each other.
    targets: dict[Path, Path] = {}
    jobs: list[tuple[Path, Path]] = []
    for path in paths:
        target = out_dir / f"{path.stem}_x{args.scale}.png"
        if target in targets:
            error(f"{path}: skipped, its output {target} would overwrite the output of {targets[target]}")
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
            info(f"skipping {skipped} image(s) whose output exists (--skip-existing)")
        jobs = todo
        if not jobs:
            return 1 if failures else 0

    up = load_upscaler(args)
    info(f"upscaling {len(jobs)} image(s) {describe(up)} into {out_dir}")
    if args.max_memory is not None:
        up.check_memory_floor(args.max_memory)
    done = 0
    for path, target in tqdm(jobs, desc=PROG, unit="img", disable=None, file=sys.stderr):
        try:
            _upscale_file(up, path, target, args)
        except FastSRError as e:
            error(str(e))
            failures += 1
            continue
        except OSError as e:
            error(f"{target}: cannot write ({e.strerror or e})")
            failures += 1
            continue
        done += 1
    info(f"wrote {done} of {len(jobs)} image(s) to {out_dir}" + (f"; {failures} problem(s) reported" if failures else ""))
    if up.model is None and up.label != "bicubic":
        info(BICUBIC_WARNING)
    return 1 if failures else 0


COMMAND = Command("super-resolve images or folders into PNGs", add_arguments, run)
