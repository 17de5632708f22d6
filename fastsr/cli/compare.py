"""`fastsr compare IMAGE --scale S -o OUT.png`: one picture of bicubic | fastsr | ground truth.

By default IMAGE is taken as the high-resolution ground truth: it is cropped to a multiple
of S and downscaled with MATLAB's bicubic (`fastsr.evaluation.make_lr`, the papers'
degradation), then upscaled back by bicubic and by the network, and both are scored against
it under the paper protocol (PSNR / SSIM on Y, shave S; `fastsr.evaluation.score`), numbers
in the labels. With --lr, IMAGE is the low-resolution input itself: bicubic | fastsr, no
ground truth and no scores.

Layout: a row of full views (each shrunk to --width pixels when wider, the crop outlined in
red), and below it the same crop of each, zoomed with nearest-neighbour pixels. The crop is
where bicubic and fastsr differ most, unless --crop X,Y,SIZE (output pixels) names it.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastsr.cli.common import (
    BICUBIC_WARNING, Command, add_model_arguments, describe, info, load_upscaler, positive_int, protocol_upscale,
)
from fastsr.errors import FastSRError

_GAP = 8  # pixels between panels
_RED = (220, 30, 30)


def _crop_arg(text: str) -> tuple[int, int, int]:
    try:
        x, y, size = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y,SIZE (three integers, output pixels), got {text!r}") from None
    if x < 0 or y < 0 or size <= 0:
        raise argparse.ArgumentTypeError(f"expected X,Y >= 0 and SIZE > 0, got {text!r}")
    return x, y, size


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The compare command's arguments."""
    p.add_argument("image", metavar="IMAGE", help="an image file (the ground truth, unless --lr)")
    p.add_argument("--output", "-o", required=True, metavar="OUT.png", help="the comparison picture (PNG)")
    add_model_arguments(p)
    p.add_argument("--lr", action="store_true",
                   help="IMAGE is the low-resolution input: upscale it as it is (no ground truth, no PSNR)")
    p.add_argument("--crop", type=_crop_arg, metavar="X,Y,SIZE",
                   help="the zoomed square, in output pixels (default: where bicubic and fastsr differ most)")
    p.add_argument("--width", type=positive_int, default=480, metavar="N",
                   help="width of each panel (full views wider than this are shrunk; default 480)")


def _auto_crop(a: torch.Tensor, b: torch.Tensor, size: int) -> tuple[int, int]:
    """Top-left of the size x size window (on a size/4 grid) where a and b (3, H, W) differ most."""
    diff = (a.float() - b.float()).abs().sum(0)[None, None]
    stride = max(1, size // 4)
    energy = torch.nn.functional.avg_pool2d(diff, size, stride=stride)[0, 0]
    iy, ix = divmod(int(energy.argmax()), energy.shape[1])
    return ix * stride, iy * stride


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


@dataclass(frozen=True)
class LabelLayout:
    """How the labels sit: each panel's label lines and crop label, the font size, and the
    heights of the band above the full views (label_h) and above the crops (crop_h)."""

    lines: list[list[str]]
    crop_labels: list[str]
    font_px: int
    label_h: int
    crop_h: int


def label_layout(labels: list[str], view_w: int, zoom: int) -> LabelLayout:
    """Labels on two lines (name, then scores: "name  scores" splits at the double space),
    in the largest font (14 px down to 8) whose every line fits a panel `view_w` wide:
    small images make narrow panels, and text must not run into the next one."""
    from PIL import Image, ImageDraw

    lines = [label.split("  ") for label in labels]
    crop_labels = [f"{parts[0]}, crop x{zoom}" for parts in lines]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    texts = [t for parts in lines for t in parts] + crop_labels
    px = next((s for s in range(14, 8, -1) if max(probe.textlength(t, font=_font(s)) for t in texts) <= view_w - 4), 8)
    return LabelLayout(lines, crop_labels, px, max(len(parts) for parts in lines) * (px + 4) + 4, px + 8)


def compose(panels: list[tuple[str, torch.Tensor]], crop: tuple[int, int, int], width: int) -> np.ndarray:
    """The picture: labelled full views in a row (shrunk to `width` when wider, the crop
    outlined), and the zoomed crop of each below. panels: (label, (3, H, W) float 0..255) of
    one size; crop: (x, y, size) in their pixels. Returns (H', W', 3) uint8."""
    from PIL import Image, ImageDraw

    h, w = panels[0][1].shape[-2:]
    x, y, size = crop
    view_w = min(width, w)
    view_h = max(1, round(h * view_w / w))
    zoom = max(1, view_w // size)
    lay = label_layout([label for label, _ in panels], view_w, zoom)
    lines, crop_labels, label_h, crop_h = lay.lines, lay.crop_labels, lay.label_h, lay.crop_h
    font = _font(lay.font_px)
    cols = len(panels)
    canvas = Image.new("RGB", (cols * view_w + (cols - 1) * _GAP, label_h + view_h + _GAP + crop_h + size * zoom),
                       "white")
    draw = ImageDraw.Draw(canvas)
    sx = view_w / w
    for i, (label, img) in enumerate(panels):
        pixels = np.ascontiguousarray(img.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
        full = Image.fromarray(pixels)
        left = i * (view_w + _GAP)
        draw.text((left + 2, 3), "\n".join(lines[i]), fill="black", font=font, spacing=4)
        view = full if view_w == w else full.resize((view_w, view_h), Image.Resampling.LANCZOS)
        canvas.paste(view, (left, label_h))
        box = (left + int(x * sx), label_h + int(y * sx),
               left + int((x + size) * sx) - 1, label_h + int((y + size) * sx) - 1)
        draw.rectangle(box, outline=_RED, width=max(1, round(2 * view_w / 480)))
        top = label_h + view_h + _GAP
        draw.text((left + 2, top + 3), crop_labels[i], fill="black", font=font)
        zoomed = full.crop((x, y, x + size, y + size)).resize((size * zoom, size * zoom), Image.Resampling.NEAREST)
        canvas.paste(zoomed, (left, top + crop_h))
    return np.asarray(canvas)


def run(args: argparse.Namespace) -> int:
    """Write the comparison picture; print the scores."""
    from fastsr.evaluation import get_protocol, make_lr, prepare_hr, score
    from fastsr.imageio import read_image, write_png
    from fastsr.inference import bicubic_upscale

    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise FastSRError(f"-o/--output {out}: expected a .png file name")
    if out.is_dir():
        raise FastSRError(f"-o/--output {out}: is a folder; expected a .png file name")
    image = read_image(args.image)
    up = load_upscaler(args)
    s = up.scale
    protocol = get_protocol("paper")
    if args.lr:
        lr = image.rgb.round().clamp(0, 255).to(torch.uint8)
        hr = None
    else:
        hr = prepare_hr(image.rgb, s, protocol, str(args.image))
        lr = make_lr(hr, s)
    info(f"comparing {args.image} {describe(up)}" + ("" if hr is None else f", from a x{s} bicubic downscale"))
    bicubic = bicubic_upscale(lr[None], s)[0].float()
    sr = protocol_upscale(up)(lr[None])[0]
    name = "fastsr" if up.model is not None else up.label
    panels = [("bicubic", bicubic), (name, sr)]
    if hr is not None:
        scores = [score(p, hr, s, protocol, gray=image.gray) for _, p in panels]
        panels = [(f"{label}  {psnr:.2f} dB / {ssim:.4f}", p) for (label, p), (psnr, ssim) in zip(panels, scores)]
        panels.append(("ground truth (HR)", hr.float()))
        info(f"PSNR / SSIM (Y, shave {protocol.shave(s)}): bicubic {scores[0][0]:.2f} dB / {scores[0][1]:.4f}, "
             f"{name} {scores[1][0]:.2f} dB / {scores[1][1]:.4f}")
    h, w = sr.shape[-2:]
    if args.crop is not None:
        x, y, size = args.crop
        if x + size > w or y + size > h:
            raise FastSRError(f"--crop {x},{y},{size}: outside the {w}x{h} output")
    else:
        size = max(8, min(h, w) // 4)
        x, y = _auto_crop(bicubic, sr, size)
    picture = compose(panels, (x, y, size), args.width)
    write_png(out, torch.from_numpy(picture.astype(np.float32)).permute(2, 0, 1))
    info(f"wrote {out} ({picture.shape[1]}x{picture.shape[0]}; crop {size}x{size} at {x},{y})")
    if up.model is None and up.label != "bicubic":
        info(BICUBIC_WARNING)
    return 0


COMMAND = Command("one picture of bicubic | fastsr | ground truth, with a zoomed crop and PSNR", add_arguments, run)
