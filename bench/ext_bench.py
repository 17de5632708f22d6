"""Benchmark of the C++ extension (fastsr.ext) against the pure-PyTorch code it replaces.

Workloads, all on the CPU:
  - imresize: a DIV2K-sized RGB uint8 image (2040x1356) by 1/4 (and back up by 4, and
    float32 by 1/4). Providers: `cpp` (fastsr.ext.imresize_fast), `torch_dense` (the
    package's fastsr.imresize: dense matmuls), `torch_sparse` (a gather/addcmul version with
    the same sparse taps as the C++ code, written here as the best pure-PyTorch rival), and
    `pillow` (Image.resize BICUBIC: fast, antialiased, but not MATLAB-exact; its max
    difference from MATLAB is in the `max_diff` column).
  - patches: batches of 16 paper-size patches (LR 48x48, HR 96x96 at x2) from 10 decoded
    DIV2K-sized images in memory. Providers: `cpp` (fastsr.ext.sample_patches), `torch`
    (its PyTorch path: the same draws, per-sample slicing) and `data_gather`
    (fastsr.data.draw_patch_params + gather_patches: the training loader's one-gather path).
  - to_uint8_hwc: a (1, 3, 1356, 2040) float32 SR output to uint8 HWC. Providers: `cpp`,
    `torch` (round().clamp().to(uint8).permute().contiguous()).

Each row is timed at 1 thread and at torch's default thread count. Times are medians with
quartiles of `--repeats` calls after a warm-up; `per_s` is calls per second; `speedup` is
provider median / cpp median at the same thread count (above 1: cpp is faster). The
machine's load average is recorded: on shared cores, multi-thread rows are noisy.

    python bench/ext_bench.py --out bench/results/ext.json [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastsr import ext  # noqa: E402
from fastsr.imresize import _contributions, _round_uint8, imresize  # noqa: E402

DIV2K_H, DIV2K_W = 1356, 2040


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_calls(fn, repeats: int, min_time_s: float = 0.0) -> dict:
    """Median and quartiles (ms) of `repeats` timed calls (or more, to fill min_time_s)."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [times[0], times[len(times) // 2], times[-1]]
    return {"median_ms": 1e3 * statistics.median(times), "q25_ms": 1e3 * q[0], "q75_ms": 1e3 * q[2],
            "calls": len(times)}


def imresize_sparse_torch(img: torch.Tensor, scale: float) -> torch.Tensor:
    """MATLAB bicubic with the sparse taps in plain PyTorch: one index_select + addcmul per tap."""
    is_uint8 = img.dtype == torch.uint8
    x = img.reshape(-1, *img.shape[-2:]).to(torch.float64 if is_uint8 else torch.float32)
    in_h, in_w = x.shape[-2:]
    out_h, out_w = math.ceil(in_h * scale), math.ceil(in_w * scale)
    for dim, n_in, n_out in ((1, in_h, out_h), (2, in_w, out_w)):  # equal scales: rows first
        w, idx = _contributions(n_in, n_out, scale, True)
        w = w.to(x.dtype)
        shape = list(x.shape)
        shape[dim] = n_out
        y = torch.zeros(shape, dtype=x.dtype)
        for k in range(w.shape[1]):
            wk = w[:, k].view(-1, 1) if dim == 1 else w[:, k]
            y.addcmul_(x.index_select(dim, idx[:, k]), wk)
        x = _round_uint8(y) if is_uint8 else y
    x = x.reshape(*img.shape[:-2], out_h, out_w)
    return x.to(torch.uint8) if is_uint8 else x


def pillow_resize(img_hwc: np.ndarray, size: tuple[int, int]):
    from PIL import Image

    return Image.fromarray(img_hwc).resize(size, Image.BICUBIC)


def bench_imresize(repeats: int, quick: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    # A smooth random image (more photo-like than noise; the timing does not depend on it).
    small = torch.randint(0, 256, (3, DIV2K_H // 8, DIV2K_W // 8), dtype=torch.uint8, generator=gen)
    img = imresize(small, size=(DIV2K_H, DIV2K_W)).contiguous()
    hwc = img.permute(1, 2, 0).contiguous().numpy()
    out_w, out_h = math.ceil(DIV2K_W / 4), math.ceil(DIV2K_H / 4)
    lr = imresize(img, 1 / 4)

    lr_hwc = lr.permute(1, 2, 0).contiguous().numpy()
    imgf = img.float()
    # workload, input shape, the reference (the package's PyTorch imresize), providers
    cases = [
        ("imresize_u8_x1/4", f"3x{DIV2K_H}x{DIV2K_W}", lambda: imresize(img, 1 / 4), {
            "cpp": lambda: ext.imresize_fast(img, 1 / 4, backend="cpp"),
            "torch_dense": lambda: imresize(img, 1 / 4),
            "torch_sparse": lambda: imresize_sparse_torch(img, 1 / 4),
            "pillow": lambda: pillow_resize(hwc, (out_w, out_h)),
        }),
        ("imresize_u8_x4", f"3x{out_h}x{out_w}", lambda: imresize(lr, 4), {
            "cpp": lambda: ext.imresize_fast(lr, 4, backend="cpp"),
            "torch_dense": lambda: imresize(lr, 4),
            "torch_sparse": lambda: imresize_sparse_torch(lr, 4),
            "pillow": lambda: pillow_resize(lr_hwc, (DIV2K_W, DIV2K_H)),
        }),
    ]
    if not quick:
        cases.append(("imresize_f32_x1/4", f"3x{DIV2K_H}x{DIV2K_W}", lambda: imresize(imgf, 1 / 4), {
            "cpp": lambda: ext.imresize_fast(imgf, 1 / 4, backend="cpp"),
            "torch_dense": lambda: imresize(imgf, 1 / 4),
            "torch_sparse": lambda: imresize_sparse_torch(imgf, 1 / 4),
        }))
    rows = []
    for workload, shape, reference, providers in cases:
        ref = reference()
        for provider, fn in providers.items():
            out = fn()
            if provider == "pillow":
                out = torch.from_numpy(np.array(out)).permute(2, 0, 1)
            max_diff = float((out.double() - ref.double()).abs().max())
            slow = provider.startswith("torch")
            rows.append({"workload": workload, "provider": provider, "shape": shape, "max_diff": max_diff,
                         "fn": fn, "repeats": max(3, repeats // 4) if slow else repeats})
    return rows


def bench_patches(repeats: int, quick: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    n_images = 4 if quick else 10
    small = [torch.randint(0, 256, (3, DIV2K_H // 8, DIV2K_W // 8), dtype=torch.uint8, generator=gen)
             for _ in range(n_images)]
    hrs = [ext.imresize_fast(s, size=(DIV2K_H, DIV2K_W)).contiguous() for s in small]
    lrs = [ext.imresize_fast(h, size=(DIV2K_H // 2, DIV2K_W // 2)).contiguous() for h in hrs]
    batch, patch, scale = 16, 48, 2
    shape = f"{batch}x3x{patch}x{patch}+{batch}x3x{scale * patch}x{scale * patch}"
    counter = iter(range(10**9))
    providers = {
        "cpp": lambda: ext.sample_patches(lrs, hrs, scale, patch, batch, next(counter), backend="cpp"),
        "torch": lambda: ext.sample_patches(lrs, hrs, scale, patch, batch, next(counter), backend="torch"),
    }
    try:
        from fastsr.data import ImageStore, draw_patch_params, gather_patches

        hr_store = ImageStore.from_images([h.clone() for h in hrs])
        lr_store = ImageStore.from_images([lr.clone() for lr in lrs])
        crop_h = torch.tensor([lr.shape[1] for lr in lrs])
        crop_w = torch.tensor([lr.shape[2] for lr in lrs])
        g = torch.Generator().manual_seed(0)

        def data_gather():
            p = draw_patch_params(g, crop_h, crop_w, scale, batch, patch)
            return gather_patches(lr_store, p, patch, 1).float(), gather_patches(hr_store, p, patch, scale).float()

        providers["data_gather"] = data_gather
    except Exception as err:  # fastsr.data's API moved: skip that row, say why
        print(f"(data_gather skipped: {err})", file=sys.stderr)
    return [{"workload": "patches_b16_p48_x2", "provider": p, "shape": shape, "max_diff": None, "fn": fn,
             "repeats": repeats * 20, "min_time_s": 0.5} for p, fn in providers.items()]


def bench_output(repeats: int, quick: bool) -> list[dict]:
    x = torch.rand(1, 3, DIV2K_H, DIV2K_W, generator=torch.Generator().manual_seed(2)) * 270 - 7
    ref = torch.round(x).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    providers = {
        "cpp": lambda: ext.to_uint8_hwc(x, backend="cpp"),
        "torch": lambda: torch.round(x).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous(),
    }
    rows = []
    for p, fn in providers.items():
        diff = float((fn().int() - ref.int()).abs().max())
        rows.append({"workload": "to_uint8_hwc", "provider": p, "shape": f"1x3x{DIV2K_H}x{DIV2K_W}",
                     "max_diff": diff, "fn": fn, "repeats": repeats})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    ap.add_argument("--repeats", type=int, default=15, help="timed calls per row (slow rows: a quarter)")
    ap.add_argument("--quick", action="store_true", help="fewer rows and images")
    ap.add_argument("--threads", default=None, help="comma list of thread counts (default: 1 and torch's default)")
    args = ap.parse_args(argv)

    ops = ext.load_extension()
    if ops is None:
        print(f"fastsr C++ extension unavailable: {ext.extension_status()}", file=sys.stderr)
        return 1
    default_threads = torch.get_num_threads()
    threads = sorted({int(t) for t in args.threads.split(",")}) if args.threads else sorted({1, default_threads})

    specs = bench_imresize(args.repeats, args.quick) + bench_patches(args.repeats, args.quick) + \
        bench_output(args.repeats, args.quick)
    results = []
    for n in threads:
        torch.set_num_threads(n)
        for spec in specs:
            timing = time_calls(spec["fn"], spec["repeats"], spec.get("min_time_s", 0.0))
            row = {k: v for k, v in spec.items() if k not in ("fn", "repeats", "min_time_s")}
            row.update(timing, threads=n, per_s=1e3 / timing["median_ms"], loadavg_1m=os.getloadavg()[0])
            results.append(row)
    torch.set_num_threads(default_threads)

    cpp_median = {(r["workload"], r["threads"]): r["median_ms"] for r in results if r["provider"] == "cpp"}
    for r in results:
        r["speedup"] = r["median_ms"] / cpp_median[(r["workload"], r["threads"])]

    header = f"{'workload':<20} {'provider':<12} {'thr':>3} {'median_ms':>10} {'q25-q75 ms':>17} {'per_s':>9} " \
             f"{'speedup':>8} {'max_diff':>9}"
    print(header)
    print("-" * len(header))
    for r in results:
        diff = "" if r["max_diff"] is None else f"{r['max_diff']:.3g}"
        print(f"{r['workload']:<20} {r['provider']:<12} {r['threads']:>3} {r['median_ms']:>10.3f} "
              f"{r['q25_ms']:>8.3f}-{r['q75_ms']:<8.3f} {r['per_s']:>9.1f} {r['speedup']:>7.1f}x {diff:>9}")
    meta = {"torch": torch.__version__, "python": platform.python_version(), "cpu": _cpu_name(),
            "cores": os.cpu_count(), "default_threads": default_threads, "extension": ext.extension_status(),
            "pillow": __import__("PIL").__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(f"\n{meta['cpu']}, {meta['cores']} cores, torch {meta['torch']}; load average at the end "
          f"{os.getloadavg()[0]:.2f} (other processes share these cores)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
