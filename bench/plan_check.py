"""Print the measured dispatch's plan for one model forward: which implementation each layer
got, with the timings that chose it (fastsr.ops.dispatch; `model.plan`).

    python bench/plan_check.py                                   # EDSR-baseline x2, 540x960, bf16, CUDA
    python bench/plan_check.py --device cpu --lr-size 48x48 --dtype float32
    python bench/plan_check.py --out plan.json                   # also write it as JSON

On CUDA the first forward times the candidates of every layer shape (the one-launch Triton
block, two Triton convs, the cuDNN floor); the second shows the cached choice and what a
forward costs then. On the CPU nothing is timed (the cpu implementation is the only one).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import fastsr
from fastsr.models.edsr import PRESETS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(PRESETS), default="edsr_baseline")
    p.add_argument("--scale", type=int, default=2)
    p.add_argument("--lr-size", default="540x960", help="HxW of the LR input (default 540x960: 1080p out at x2)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="the fused path's compute dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="write {'plan': ..., 'backend': ...} as JSON here")
    args = p.parse_args(argv)
    h, w = (int(v) for v in args.lr_size.lower().split("x"))
    dtype = DTYPES[args.dtype]
    factory = PRESETS[args.model]
    kw = dict(fused=True, dtype=None if dtype == torch.float32 else dtype)
    model = (factory(args.scale, **kw) if args.model.startswith("edsr") else factory(**kw)).to(args.device).eval()
    call_kw = {"scale": args.scale} if isinstance(model, fastsr.MDSR) else {}
    x = torch.rand(1, 3, h, w, device=args.device) * 255
    seconds = []
    with torch.no_grad():
        for _ in range(2):  # the first forward chooses (and times, on CUDA); the second runs the choice
            start = time.perf_counter()
            model(x, **call_kw)
            if x.is_cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
    print(f"{args.model} x{args.scale} {h}x{w} {args.dtype} on {args.device}: backend {model.backend}; "
          f"first forward {seconds[0] * 1e3:.1f} ms (choosing), second {seconds[1] * 1e3:.1f} ms")
    for entry in model.plan:
        times = entry.get("times_ms")
        timed = "" if not times else "  " + ", ".join(f"{k} {v:.3f} ms" for k, v in sorted(times.items(), key=lambda t: t[1]))
        print(f"  {entry['layer']:<24} {entry['implementation']:<13}{timed}")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "scale": args.scale, "lr_size": [h, w],
                                        "dtype": args.dtype, "device": args.device, "backend": model.backend,
                                        "seconds": seconds, "plan": model.plan}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
