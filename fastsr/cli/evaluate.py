"""`fastsr eval DATASET_DIR... --scale S...`: PSNR / SSIM of folders of HR images under the
papers' protocol (`fastsr.evaluation`), one table of datasets by scales."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fastsr.cli.common import (
    BICUBIC_WARNING, PROG, Command, add_model_arguments, describe, error, info, load_upscaler, protocol_upscale,
)
from fastsr.errors import FastSRError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The eval command's arguments."""
    from fastsr.evaluation import PROTOCOLS

    p.add_argument("datasets", nargs="+", metavar="DATASET_DIR", help="folders of HR images (e.g. Set5 Set14)")
    add_model_arguments(p)
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


def run(args: argparse.Namespace) -> int:
    """Score every dataset at every scale; exit status 1 when an image could not be scored."""
    from tqdm import tqdm

    from fastsr.evaluation import evaluate_image, get_protocol, summarize
    from fastsr.imageio import list_images, read_image, write_png

    protocol = get_protocol(args.protocol)
    scales = list(dict.fromkeys(args.scale or []))  # in the order given, once each
    datasets = []
    for d in args.datasets:
        folder = Path(d)
        if not folder.is_dir():
            raise FastSRError(f"{folder}: not a folder of images")
        paths = list_images([folder])
        if not paths:
            raise FastSRError(f"{folder}: no image files in this folder")
        datasets.append((folder, paths))
    if not scales:  # no --scale: the weights file's own
        up = load_upscaler(args)
        scales, upscalers = [up.scale], {up.scale: up}
    else:
        upscalers = {s: load_upscaler(argparse.Namespace(**{**vars(args), "scale": s})) for s in scales}
    images = {}  # decoded once, reused for every scale
    results = []
    start = time.perf_counter()
    n_total = sum(len(p) for _, p in datasets) * len(scales)
    bar = tqdm(total=n_total, desc=PROG, unit="img", disable=None, file=sys.stderr, leave=False)
    for s in scales:
        up = upscalers[s]
        info(f"evaluating {', '.join(str(f) for f, _ in datasets)} {describe(up)}, protocol {protocol.name}")
        sr_fn = protocol_upscale(up)
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
                    error(message)
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
            "dtype": str(first.compute_dtype).replace("torch.", ""),
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
        info(BICUBIC_WARNING)
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


COMMAND = Command("PSNR/SSIM of a folder of HR images under the papers' protocol", add_arguments, run)
