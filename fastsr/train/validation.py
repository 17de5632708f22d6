"""Validation during training: the papers' protocol (fastsr.evaluation) on a folder or a
held-out split, PSNR/SSIM per scale.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from fastsr.errors import FastSRError


class Validator:
    """The evaluation protocol (fastsr.evaluation, `protocol`) on validation HR images, with
    the HR cropped and the LR made once per scale. Means over the images."""

    def __init__(self, folder: str | os.PathLike, scales: Sequence[int], device: torch.device,
                 paths: Sequence[Path] | None = None, protocol: str = "paper"):
        """folder: the validation HR folder; paths: only these images of it (None: all)."""
        from fastsr.data import DatasetError
        from fastsr.evaluation import get_protocol, make_lr, prepare_hr
        from fastsr.imageio import list_images, read_image

        self.folder = Path(folder)
        self.protocol = get_protocol(protocol)
        if not self.folder.is_dir():
            raise DatasetError(f"{self.folder}: validation folder does not exist")
        paths = list(paths) if paths is not None else list_images([self.folder])
        if not paths:
            raise DatasetError(f"{self.folder}: no image files in the validation folder")
        self.items: dict[int, list[tuple[str, bool, torch.Tensor, torch.Tensor]]] = {s: [] for s in scales}
        for path in paths:
            image = read_image(path)
            for s in scales:
                try:
                    hr = prepare_hr(image.rgb, s, self.protocol, str(path))
                except FastSRError as e:
                    raise DatasetError(str(e)) from None
                self.items[s].append((path.name, image.gray, make_lr(hr, s)[None].float().to(device), hr))

    @torch.no_grad()
    def run(self, model: nn.Module) -> dict[str, float]:
        """{'psnr_x2': .., 'ssim_x2': .., ..., 'psnr': mean over scales, 'ssim': ...}."""
        from fastsr.evaluation import score
        from fastsr.metrics import quantize

        was_training = model.training
        model.eval()
        out: dict[str, float] = {}
        try:
            for s, items in self.items.items():
                ps, ss = [], []
                for _, gray, lr, hr in items:
                    sr = quantize(model(lr, scale=s).float())[0].cpu()
                    p, q = score(sr, hr, s, self.protocol, gray)
                    ps.append(p)
                    ss.append(q)
                out[f"psnr_x{s}"], out[f"ssim_x{s}"] = sum(ps) / len(ps), sum(ss) / len(ss)
        finally:
            model.train(was_training)
        scales = list(self.items)
        out["psnr"] = sum(out[f"psnr_x{s}"] for s in scales) / len(scales)
        out["ssim"] = sum(out[f"ssim_x{s}"] for s in scales) / len(scales)
        return out
