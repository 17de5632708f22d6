"""ONNX export: the eager-equivalent graph of a model's weights, for other runtimes.

What a user gains: the network runs wherever ONNX does (ONNX Runtime, TensorRT, OpenVINO,
browsers, phones) without PyTorch. What they lose: fastsr's fused kernels; the file holds
standard Conv/Add/Relu/DepthToSpace-style ops, so its speed is whatever the runtime makes of
them. A fused model (fused=True) exports the same graph as its eager twin: the forward
switches to the eager modules while torch.onnx.export traces it (fastsr.models.edsr).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from fastsr.atomic import atomic_write
from fastsr.errors import FastSRError
from fastsr.models.edsr import MDSR


class _AtScale(nn.Module):
    """An MDSR at one of its scales, as a one-input module (ONNX graphs have no Python ints)."""

    def __init__(self, model: MDSR, scale: int):
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, scale=self.scale)


def export_onnx(model: nn.Module, path: str | os.PathLike, *, scale: int | None = None,
                opset: int | None = None) -> Path:
    """Write `model` (EDSR or MDSR, fused or not) to `path` as ONNX, atomically.

    The graph takes "image": (N, 3, H, W) float32 in 0..model.input_range with N, H and W
    dynamic, and returns "sr": (N, 3, s*H, s*W) float32, not clamped (as forward does).
    scale: required for MDSR (one graph per scale), must match for EDSR. opset: the ONNX
    opset (default: the exporter's). Needs the `onnx` and `onnxscript` packages (the
    optional extra fastsr[onnx]); the model is put in eval mode.
    """
    missing = [name for name in ("onnx", "onnxscript") if not _importable(name)]
    if missing:
        raise FastSRError(f"ONNX export needs {' and '.join(missing)}: pip install 'fastsr[onnx]'")
    if isinstance(model, MDSR):
        if scale is None:
            raise FastSRError(f"an MDSR holds scales {', '.join(map(str, model.scales))}: pass scale= for its graph")
        model.scale_index(scale)  # raises for a scale the model does not hold
        module: nn.Module = _AtScale(model, scale)
    else:
        if scale is not None and scale != model.scale:
            raise FastSRError(f"this EDSR is x{model.scale}, scale={scale} was asked for")
        module = model
    model.eval()
    device = next(model.parameters()).device
    # Batch 2 and sizes other than 1: torch.export fixes any dimension traced at size 0 or 1.
    example = torch.rand(2, 3, 32, 40, device=device) * float(model.input_range)
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}

    def write(tmp: str) -> None:
        # The exporter prints its steps to stdout and logs absent torchvision ops; the caller
        # (the command line) says what happened in one line instead.
        onnx_log = logging.getLogger("torch.onnx")
        level = onnx_log.level
        onnx_log.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                program = torch.onnx.export(module, (example,), dynamo=True, input_names=["image"],
                                            output_names=["sr"], dynamic_shapes={"x": dims},
                                            opset_version=opset, verbose=False)
                program.save(tmp)
        finally:
            onnx_log.setLevel(level)

    return atomic_write(Path(path), write)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
