"""`fastsr upscale IN... -o OUT`: images, animations, videos and folders (--recursive: with
their subfolders' structure) into OUT. Stills become OUT/<stem>_x<S>.png, streamed tile by
tile (within --max-memory when given); animated GIF / WebP every frame, in their format;
videos through `fastsr.video`. Under torchrun the ranks split the files (`run`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from fastsr.cli.common import (
    BICUBIC_WARNING, PROG, Command, add_model_arguments, describe, error, info, load_upscaler,
    positive_int, size_arg,
)
from fastsr.distributed import Dist
from fastsr.errors import FastSRError
from fastsr.inference import Upscaler, format_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The upscale command's arguments."""
    from fastsr.imageio import DEFAULT_MAX_PIXELS

    p.add_argument("inputs", nargs="+", metavar="IN", help="image or video files and/or folders")
    p.add_argument("--output", "-o", required=True, metavar="OUT",
                   help="output folder: OUT/<stem>_x<S>.png (animated GIF / WebP: OUT/<stem>_x<S>.gif / .webp; "
                        "video: OUT/<stem>_x<S>.mp4 etc., same container, frame count and rate, audio copied; "
                        "needs fastsr[video])")
    p.add_argument("--recursive", "-r", action="store_true",
                   help="also read the folders' subfolders, writing OUT/<subfolder>/<stem>_x<S>.png")
    add_model_arguments(p)
    p.add_argument("--batch", type=positive_int, default=4, metavar="N",
                   help="video frames per network call (default 4)")
    p.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"refuse inputs with more pixels (all frames of an animation together), checked before "
                        f"decoding (default {DEFAULT_MAX_PIXELS:,})")
    p.add_argument("--max-memory", type=size_arg, metavar="SIZE",
                   help="keep the process's peak resident memory under SIZE (e.g. 2GiB, 1500MB): picks the tile "
                        "size from it; an image that cannot fit is refused before it is decoded")
    p.add_argument("--skip-existing", action="store_true",
                   help="skip inputs whose output exists (outputs are written atomically, so one that "
                        "exists is complete): resumes an interrupted run")


class _Job(NamedTuple):
    path: Path
    target: Path
    kind: str  # "image"; "animation": an animated GIF / WebP, written as one; "video"


def _collect_inputs(inputs: Sequence[str], recursive: bool, out_dir: Path) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(image, its folder relative to the input folder it was found in) pairs, and errors.
    The output folder is never read as input (it may sit inside an input folder)."""
    from fastsr.imageio import IMAGE_EXTENSIONS, list_images
    from fastsr.video import VIDEO_EXTENSIONS

    found_all: list[tuple[Path, Path]] = []
    errors: list[str] = []
    seen: set[Path] = set()
    out_resolved = out_dir.resolve()
    for item in inputs:
        root = Path(item)
        found = list_images([root], recursive=recursive, extensions=IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
        if root.is_dir():
            found = [p for p in found if not p.resolve().is_relative_to(out_resolved)]
            if not found:
                known = " ".join(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
                errors.append(f"{item}: folder holds no image or video files ({known})"
                              + ("" if recursive else "; --recursive reads its subfolders too"))
            if not recursive:
                subs = [c for c in root.iterdir() if c.is_dir() and not c.name.startswith(".")]
                if subs:
                    info(f"{item}: {len(subs)} subfolder(s) not read (--recursive reads them)")
        for p in found:
            if p not in seen:
                seen.add(p)
                found_all.append((p, p.parent.relative_to(root) if root.is_dir() else Path()))
    return found_all, errors


def _plan(paths: list[tuple[Path, Path]], out_dir: Path, scale: int) -> tuple[list[_Job], int]:
    """One job per input with its output name; two inputs writing one output: the second is
    reported and skipped (a.png and a.jpg, or two folders). Returns (jobs, problems)."""
    from fastsr.imageio import frame_count
    from fastsr.video import VIDEO_EXTENSIONS

    targets: dict[Path, Path] = {}
    jobs: list[_Job] = []
    problems = 0
    for path, rel in paths:
        suffix = path.suffix.lower()
        if suffix in VIDEO_EXTENSIONS:
            kind = "video"
        elif suffix in (".gif", ".webp") and frame_count(path) > 1:
            kind = "animation"
        else:
            kind, suffix = "image", ".png"
        target = out_dir / rel / f"{path.stem}_x{scale}{suffix}"
        if target in targets:
            error(f"{path}: skipped, its output {target} would overwrite the output of {targets[target]}")
            problems += 1
            continue
        targets[target] = path
        jobs.append(_Job(path, target, kind))
    return jobs, problems


def _crop_upscaler(up: Upscaler, bit_depth: int, name: str) -> Callable[[np.ndarray], torch.Tensor]:
    """crop (h, w, C) samples -> (C, s*h, s*w) float32: the network on RGB (gray: on gray copied
    to RGB, its output back to gray with Pillow's L = 0.299 R + 0.587 G + 0.114 B), bicubic on alpha."""
    from fastsr.imresize import imresize

    luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)

    def run(crop: np.ndarray) -> torch.Tensor:
        data = torch.from_numpy(crop.astype(np.float32)).permute(2, 0, 1)
        if bit_depth == 16:
            data = data * (255.0 / 65535.0)  # as read_image
        channels = data.shape[0]
        gray = channels in (1, 2)
        rgb = data[:1].expand(3, -1, -1) if gray else data[:3]
        sr = up.run_guarded(rgb.contiguous()[None], name)[0]
        if gray:
            sr = (sr * luma).sum(0, keepdim=True)
        if channels in (2, 4):
            # Alpha is not something the network was trained on: plain bicubic, clamped.
            alpha = imresize(data[-1].contiguous(), scale=up.scale).clamp_(0, 255)
            sr = torch.cat([sr, alpha[None]])
        return sr

    return run


class _Notes:
    """Warnings given once per run, not once per image; bars: whether this process draws
    progress bars (under torchrun, rank 0 alone)."""

    def __init__(self, bars: bool = True) -> None:
        self.given: set[str] = set()
        self.bars = bars
        self.graphs = False  # the model replays CUDA graphs (videos)

    def once(self, key: str, message: str) -> None:
        if key not in self.given:
            self.given.add(key)
            info(f"warning: {message}")


# A tile whose context makes the run this many times the untiled work gets a warning.
_OVERLAP_WARN_COST = 2.0


def _tile_for(up: Upscaler, name: str, shape: tuple[int, int, int], bit_depth: int,
              args: argparse.Namespace, base: int, notes: _Notes) -> int | None:
    """`Upscaler.choose_tile`, announced when the memory bound picked it, with a warning
    when the tiles' overlap costs more than _OVERLAP_WARN_COST times the untiled work."""
    from fastsr.inference import tile_cost

    limit = args.max_memory
    tile, peak = up.choose_tile(name, shape, bit_depth, limit, base)
    h, w = shape[:2]
    if peak is not None and tile is not None and tile < max(h, w):
        info(f"{name}: {tile}x{tile} tiles for --max-memory {format_size(limit)} (estimated peak {format_size(peak)})")
    cost = tile_cost((h, w), tile, up.context)
    if cost > _OVERLAP_WARN_COST:
        fix = "use a larger --tile or --tile auto" if isinstance(up.tile, int) else "raise --max-memory"
        notes.once("overlap", f"{name}: {tile}x{tile} tiles, each run with {up.context} px of context per side, "
                              f"cost about {cost:.1f}x the work of an untiled run (the overlap dominates); {fix}")
    return tile


def _bar(total: int, name: str, unit: str, notes: _Notes):
    from tqdm import tqdm

    return tqdm(total=total, desc=name, unit=unit, leave=False, disable=None if notes.bars else True, file=sys.stderr)


def _upscale_file(up: Upscaler, job: _Job, args: argparse.Namespace, notes: _Notes) -> None:
    """Decode, upscale tile by tile and stream the PNG out; FastSRError / OSError on failure.

    Peak memory: the decoded samples, one band of output rows and one tile's work (see
    `fastsr.inference.upscale_peak_bytes`); with --max-memory the tile comes from the bound,
    and the bound is checked from the header before decoding. Gray (+ alpha) stays gray.
    """
    from fastsr.atomic import remove_stale_temps
    from fastsr.imageio import read_header, read_pixels
    from fastsr.inference import tile_count, upscale_rows
    from fastsr.pngstream import write_png_rows

    path, target = job.path, job.target
    limit = args.max_memory
    header = read_header(path) if limit is not None else None
    base = up.memory_baseline(None if header is None else header[0][:2]) if limit is not None else 0
    if header is not None and header[0][0] * header[0][1] <= args.max_pixels:  # else: read_pixels refuses
        up.choose_tile(str(path), *header, limit, base)  # refuses before decoding
    pixels, bit_depth = read_pixels(path, args.max_pixels)
    tile = _tile_for(up, str(path), pixels.shape, bit_depth, args, base, notes)
    h, w, channels = pixels.shape
    process = _crop_upscaler(up, bit_depth, str(path))
    tiles = tile_count((h, w), tile)
    bar = _bar(tiles, path.name, "tile", notes) if tiles > 1 else None  # one image taking a while: its ETA

    def counted(crop: np.ndarray) -> torch.Tensor:
        out = process(crop)
        bar.update(1)
        return out

    rows = upscale_rows(counted if bar is not None else process, pixels, up.scale, tile, up.context, bit_depth)
    remove_stale_temps(target)  # left by a killed earlier run
    try:
        write_png_rows(target, rows, w * up.scale, h * up.scale, channels, bit_depth)
    finally:
        if bar is not None:
            bar.close()


def _upscale_animation(up: Upscaler, job: _Job, args: argparse.Namespace, notes: _Notes) -> None:
    """Every frame of an animated GIF / WebP, written as one of the same format, durations and
    loop count (GIF: Pillow's palette per frame). The frames are held in memory."""
    from fastsr.atomic import remove_stale_temps
    from fastsr.imageio import Animation, read_animation, write_animation
    from fastsr.inference import upscale_rows

    base = up.memory_baseline(None) if args.max_memory is not None else 0
    anim = read_animation(job.path, args.max_pixels)
    tile = _tile_for(up, str(job.path), anim.frames[0].shape, 8, args, base, notes)
    process = _crop_upscaler(up, 8, str(job.path))
    out = []
    bar = _bar(len(anim.frames), job.path.name, "frame", notes)
    try:
        for frame in anim.frames:
            out.append(np.concatenate(list(upscale_rows(process, frame, up.scale, tile, up.context))))
            bar.update(1)
    finally:
        bar.close()
    remove_stale_temps(job.target)
    write_animation(job.target, Animation(out, anim.durations, anim.loop))


def _upscale_video(up: Upscaler, job: _Job, args: argparse.Namespace, notes: _Notes,
                   part: tuple[int, int] | None = None) -> None:
    """Every frame of a video, --batch at a time (one with --max-memory, which picks the tile),
    into a video of the same container, frame count and rate, audio copied (`fastsr.video`);
    part (i, n): the i-th of n runs of its frames, for `_upscale_shared_video`. On CUDA the
    fused model replays CUDA graphs for the repeated frame shape."""
    from fastsr.atomic import remove_stale_temps
    from fastsr.video import probe, upscale_video

    meta = probe(job.path)
    batch, tile = args.batch, up.tile
    if args.max_memory is not None:
        base = up.memory_baseline((meta.height, meta.width))
        batch, tile = 1, _tile_for(up, str(job.path), (meta.height, meta.width, 3), 8, args, base, notes)
    if up.device.type == "cuda" and getattr(up.model, "fused", False) and not notes.graphs:
        up.model.prepare_for_inference(cuda_graphs=True)
        notes.graphs = True
    bar = _bar((meta.frames // part[1] if part else meta.frames) or None, job.path.name, "frame", notes)
    remove_stale_temps(job.target)
    try:
        upscale_video(lambda lr: up.run_guarded(lr, str(job.path), tile), job.path, job.target, up.scale,
                      batch=batch, on_frames=bar.update, part=part)
    finally:
        bar.close()


_UPSCALE = {"image": _upscale_file, "animation": _upscale_animation, "video": _upscale_video}


def _upscale_shared_video(up: Upscaler, job: _Job, args: argparse.Namespace, notes: _Notes, dist: Dist) -> bool:
    """One video over every rank: rank i upscales the i-th run of its frames into a hidden part
    file beside the output, rank 0 joins the parts (audio copied) and every part is removed.
    True when the output was written (the same answer on every rank)."""
    from fastsr.video import join_video_parts

    def part_path(rank: int) -> Path:
        return job.target.with_name(f".{job.target.stem}.part{rank}{job.target.suffix}")

    message = None
    try:
        _upscale_video(up, job._replace(target=part_path(dist.rank)), args, notes, part=(dist.rank, dist.world))
    except FastSRError as e:
        message = str(e)
    except OSError as e:
        message = f"{job.target}: cannot write ({e.strerror or e})"
    if message is not None:
        error(message)
    ok = all(m is None for m in dist.gather(message))
    try:
        if ok and dist.main:
            join_video_parts([part_path(r) for r in range(dist.world)], job.path, job.target)
    except (FastSRError, OSError) as e:
        error(str(e))
        ok = False
    finally:
        dist.barrier()  # rank 0 has read every part
        part_path(dist.rank).unlink(missing_ok=True)
    return dist.broadcast(ok)


def _plan_run(args: argparse.Namespace, out_dir: Path) -> tuple[list[_Job], int]:
    """The jobs (after --skip-existing) and the problems already reported; FastSRError when
    there is nothing to upscale."""
    paths, errors = _collect_inputs(args.inputs, args.recursive, out_dir)
    for message in errors:
        error(message)
    jobs, problems = _plan(paths, out_dir, args.scale)
    failures = len(errors) + problems
    if not jobs:
        raise FastSRError("no input images to upscale")
    if args.skip_existing:
        todo = [job for job in jobs if not job.target.exists()]
        if len(todo) < len(jobs):
            info(f"skipping {len(jobs) - len(todo)} image(s) whose output exists (--skip-existing)")
        jobs = todo
    return jobs, failures


def run(args: argparse.Namespace) -> int:
    """Upscale every input; exit status 1 when any input or output had a problem.

    Under torchrun (WORLD_SIZE > 1) the ranks share the work: rank 0 lists and plans the
    files, every rank upscales its share (file i on rank i mod WORLD_SIZE; a video's frames
    split over all ranks), each on its own device (cuda:LOCAL_RANK with --device auto or
    cuda), and rank 0 reports the totals.
    """
    from fastsr import distributed

    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise FastSRError(f"{out_dir}: exists and is not a folder (-o/--output names a folder)")
    dist = distributed.from_env()
    if dist.world > 1:
        if args.device != "cuda" or torch.cuda.is_available():  # else load_upscaler says why not
            args.device = str(distributed.rank_device(args.device, dist))
        distributed.start(dist, torch.device("cuda" if args.device.startswith("cuda") else "cpu"))
    try:
        return _run(args, out_dir, dist)
    finally:
        distributed.stop(dist)


def _run(args: argparse.Namespace, out_dir: Path, dist: Dist) -> int:
    from tqdm import tqdm

    up = None
    if args.scale is None:  # the weights file's own scale names the outputs: load it first
        up = load_upscaler(args)
        args.scale = up.scale
    plan: tuple[list[_Job], int] | str | None = None
    if dist.main:
        try:
            plan = _plan_run(args, out_dir)
        except FastSRError as e:
            plan = str(e)
    plan = dist.broadcast(plan)
    if isinstance(plan, str):  # rank 0 reports it; the other ranks only follow
        if dist.main:
            raise FastSRError(plan)
        return 1
    jobs, planned = plan  # problems rank 0 found (and reported) while listing
    if not jobs:
        return 1 if planned else 0
    # Files go round the ranks; under several ranks each video is shared by all (its frames split).
    shared = [job for job in jobs if job.kind == "video"] if dist.world > 1 else []
    mine = [job for job in jobs if job not in shared][dist.rank::dist.world]

    up = up or load_upscaler(args)
    if dist.main:
        ranks = f" over {dist.world} ranks" if dist.world > 1 else ""
        info(f"upscaling {len(jobs)} image(s){ranks} {describe(up)} into {out_dir}")
    if args.max_memory is not None:
        up.check_memory_floor(args.max_memory)
    done = failures = 0
    notes = _Notes(bars=dist.main)
    for job in tqdm(mine, desc=PROG, unit="img", disable=None if dist.main else True, file=sys.stderr):
        try:
            _UPSCALE[job.kind](up, job, args, notes)
        except FastSRError as e:
            error(str(e))
            failures += 1
            continue
        except OSError as e:
            error(f"{job.target}: cannot write ({e.strerror or e})")
            failures += 1
            continue
        done += 1
    for job in shared:
        ok = _upscale_shared_video(up, job, args, notes, dist)
        if dist.main:  # counted once
            done, failures = done + ok, failures + (not ok)
    counts = dist.gather((done, failures))
    done, failures = sum(c[0] for c in counts), planned + sum(c[1] for c in counts)
    if dist.main:
        problems = f"; {failures} problem(s) reported" if failures else ""
        ran = f" (the network ran on: {up.model.backend})" if up.model is not None and done else ""
        info(f"wrote {done} of {len(jobs)} image(s) to {out_dir}{ran}{problems}")
        if up.model is None and up.label != "bicubic":
            info(BICUBIC_WARNING)
    return 1 if failures else 0


COMMAND = Command("super-resolve images or folders into PNGs", add_arguments, run)
