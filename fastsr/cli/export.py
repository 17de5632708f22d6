"""`fastsr export WEIGHTS --onnx OUT.onnx`: the network as an ONNX file (`fastsr.export`)."""
from __future__ import annotations

import argparse

from fastsr.checkpoints import LAYOUTS
from fastsr.cli.common import Command, info, weights_file
from fastsr.models.edsr import PRESETS, SUPPORTED_SCALES


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The export command's arguments."""
    p.add_argument("weights", metavar="WEIGHTS",
                   help="a checkpoint file, 'default', 'official' or hf://OWNER/REPO[/FILE] (as upscale's --weights)")
    p.add_argument("--onnx", required=True, metavar="OUT.onnx", help="where to write the ONNX file")
    p.add_argument("--scale", "-s", type=int, choices=SUPPORTED_SCALES,
                   help="the scale (default: the file's own; required for MDSR files and with default/official)")
    p.add_argument("--model", choices=sorted(PRESETS), metavar="PRESET",
                   help="with default/official: the preset whose weights to export (default edsr_baseline)")
    p.add_argument("--layout", choices=LAYOUTS, default="auto", help="how the file is laid out (as upscale's)")
    p.add_argument("--opset", type=int, metavar="N", help="ONNX opset version (default: the exporter's)")


def run(args: argparse.Namespace) -> int:
    """Build the model the weights hold and write its eager graph as ONNX."""
    from fastsr.checkpoints import model_arch_tag, model_from_checkpoint
    from fastsr.export import export_onnx
    from fastsr.models.edsr import MDSR

    source = weights_file(args.weights, args.model, args.scale)
    model = model_from_checkpoint(source, layout=args.layout)
    scale = args.scale if args.scale is not None or isinstance(model, MDSR) else model.scale
    path = export_onnx(model, args.onnx, scale=scale, opset=args.opset)
    info(f"wrote {path}: {model_arch_tag(model)} x{scale} from {source}; input 'image' (N, 3, H, W) float32 "
         f"in 0..{model.input_range:g}, output 'sr' (N, 3, {scale}H, {scale}W), N/H/W dynamic")
    return 0


COMMAND = Command("write a model as an ONNX file (the eager graph of its weights, for other runtimes)",
                  add_arguments, run)
