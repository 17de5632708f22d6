"""fastsr benchmark: fused kernels and models against what users would otherwise run.

    python bench/run.py                  # everything for this device
    python bench/run.py --quick          # a small subset (~1 minute on CPU)
    python bench/run.py --only resblock  # workloads whose name contains the pattern
    python bench/run.py --compare bench/results/OLD.json
    python bench/run.py --out bench/results   # a run meant to be committed

Output (CSV/JSON/PNG) goes to --out, by default $FASTSR_BENCH_OUT or ~/.cache/fastsr/bench
(never into the source tree's bench/results, where committed runs live, unless asked to).

Providers, side by side in one process:
    eager_nchw   the official EDSR-PyTorch way: NCHW eager modules
    eager_cl     the same modules channels-last (cuDNN / oneDNN's preferred layout)
    compile      torch.compile of the eager model (GPU also: compile_max, max-autotune)
    fused        fastsr's fused path, each layer's implementation the measured choice
                 (fastsr.ops.dispatch: the Triton kernels or the aten floor on GPU)
    fused_triton (GPU) the fused path with the Triton kernels forced everywhere: their own speed
    fused_cpu    (CPU) the fused path with fastsr's native cpu implementation forced (no OpenVINO)
    openvino, onnxruntime  (CPU, model forward rows, when installed) the CPU engines users could
                 run instead: OpenVINO (f32 hint / bf16) and ONNX Runtime (fp32) on the same weights
each at fp32 and bf16 (and fp16 on GPU). Rows: median and quartiles of the time, the
ratio of each provider's median to the fused one's (>1: fused is faster), FLOP/s and
bytes/s against peaks measured in the same run (the best of square matmuls from 2048 up on
CPU, a 64 MiB copy), peak memory of live tensors, and compile time apart from run time. A
column-header line comes before the rows, and a summary of fused against eager_cl per dtype
after them (see summarize_vs_eager).
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

import fastsr
from fastsr.memory import TensorMemory, activation_bytes
from fastsr.ops import conv2d, resblock
from fastsr.ops.reference import conv2d_ref, resblock_ref

CL = torch.channels_last
RESULTS = Path(__file__).resolve().parent / "results"  # committed runs: written there only with --out
COLUMNS = [
    "workload", "kind", "mode", "shape", "provider", "dtype", "backend", "median_ms", "q25_ms", "q75_ms",
    "ratio_vs_fused", "gflops", "tflops_per_s", "flop_frac_of_peak", "flop_peak_tflops", "flop_peak_source",
    "gbytes", "gb_per_s", "bw_frac_of_peak", "bw_peak_gb_per_s", "peak_mem_mb", "act_mem_mb", "compile_s", "device",
    "torch", "triton", "date", "cpu_heap",
]


# ----------------------------------------------------------------------------- timing


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device: str, min_repeats: int, min_time_s: float, warm: bool = True) -> list[float]:
    """Milliseconds per call after warm-up (warm=False: the caller warmed fn up): CUDA events
    on GPU, a monotonic clock on CPU."""
    if warm:
        t = time.perf_counter()
        fn()
        _sync(device)
        if time.perf_counter() - t > 2.0:  # slow calls (big models on CPU): fewer repeats
            min_repeats = min(min_repeats, 3)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < min_repeats or (time.perf_counter() - start_all < min_time_s and len(times) < 200):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return times


def time_interleaved(fns: dict, device: str, min_repeats: int, min_time_s: float, slow: bool) -> dict[str, list[float]]:
    """Milliseconds per call of each provider of one workload, timed in interleaved rounds:
    every round calls each provider once, in a fresh random order (seeded), so drift of the
    machine (clocks, a neighbour's load) lands on all of them alike and no provider always runs
    right after the same other one. Each fn was warmed up by the caller; `slow` (a warm-up
    call over 2 s) caps the repeats at 3. Rounds go on until every provider has min_repeats
    calls and min_time_s of its own timed calls, at most 200 rounds."""
    import random

    if slow:
        min_repeats = min(min_repeats, 3)
    order = random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in fns}
    while any(len(v) < min_repeats for v in times.values()) or (
            min(sum(v) for v in times.values()) < min_time_s * 1e3 and len(next(iter(times.values()))) < 200):
        names = list(fns)
        order.shuffle(names)
        for name in names:
            times[name] += time_fn(fns[name], device, 1, 0.0, warm=False)
    return times


def quartiles(times: list[float]) -> tuple[float, float, float]:
    if len(times) < 4:
        s = sorted(times)
        return s[len(s) // 2], s[0], s[-1]
    q = statistics.quantiles(times, n=4)
    return statistics.median(times), q[0], q[2]


def peak_memory_mb(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with TensorMemory() as pm:
        fn()
    return pm.peak / 2**20


# Square matmul sizes tried for the FLOP/s peak, smallest first. A 1024 matmul (the old
# --quick size) is far from the peak: on 2 Xeon cores it measured 0.5-1.2 TFLOP/s bf16
# where 3072 reached 1.9-2.1, so convs read above 200% "of peak". 2048 is the floor even
# in --quick; larger sizes follow while PEAK_BUDGET_S allows (there: 2048 and 3072, about
# 1.1 s per dtype including the copy).
MATMUL_SIZES = {"cpu": (2048, 3072, 4096), "cuda": (4096, 8192, 16384)}
PEAK_BUDGET_S = 2.0  # wall time allowed for one dtype's matmul ladder


@dataclass
class Peaks:
    """What one dtype's rows are measured against: the best matmul rate and a copy's bandwidth."""
    flops: float        # FLOP/s of the fastest square matmul tried
    bytes_per_s: float  # bytes/s (read + write) of a 64 MiB copy
    matmul_n: int       # the n of the n x n matmul that reached `flops`
    seconds: float      # wall time spent measuring both

    @property
    def label(self) -> str:
        """How the FLOP/s peak was obtained, as printed and written to the CSV."""
        return f"measured matmul peak ({self.matmul_n}x{self.matmul_n})"


def measure_matmul_peak(device: str, dtype: torch.dtype, sizes: Sequence[int],
                        budget_s: float = PEAK_BUDGET_S) -> tuple[float, int]:
    """Returns (best FLOP/s, the n that reached it) over square n x n matmuls of increasing n.

    Each size gets a warm-up and two timed calls; the best call counts, since interference
    only ever slows a call down. The first size always runs; a larger one only if its
    predicted cost (three calls, time scaling as n^3) still fits in budget_s.
    """
    start = time.perf_counter()
    best, best_n = 0.0, sizes[0]
    for i, n in enumerate(sizes):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        t = min(time_fn(lambda: a @ b, device, 2, 0.0)) / 1e3
        if 2 * n**3 / t > best:
            best, best_n = 2 * n**3 / t, n
        if i + 1 < len(sizes):
            predicted = 3 * t * (sizes[i + 1] / n) ** 3
            if time.perf_counter() - start + predicted > budget_s:
                break
    return best, best_n


def measure_peaks(device: str, dtype: torch.dtype) -> Peaks:
    """Returns the Peaks of this machine for dtype, measured now (the same in --quick and full runs)."""
    start = time.perf_counter()
    flops, n = measure_matmul_peak(device, dtype, MATMUL_SIZES.get(device, MATMUL_SIZES["cuda"]))
    src = torch.empty(64 * 2**20 // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = statistics.median(time_fn(lambda: dst.copy_(src), device, 3, 0.2)) / 1e3
    _sync(device)
    return Peaks(flops, 2 * src.numel() * 4 / t, n, time.perf_counter() - start)


# -------------------------------------------------------------------------- workloads


def conv_flops(cin: int, cout: int, k: int, pixels: int) -> float:
    return 2.0 * k * k * cin * cout * pixels


def model_flops(model: nn.Module, h: int, w: int, scale_idx: int = 0) -> float:
    """FLOPs of one forward at LR size h x w: convs only (epilogues are noise)."""
    total = 0.0
    pixels = h * w
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Conv2d) or name.endswith("_mean"):
            continue
        if isinstance(model, fastsr.MDSR):
            if (name.startswith("pre_process.") or name.startswith("upsample.")) and f".{scale_idx}." not in name[:14]:
                continue
        total += conv_flops(mod.in_channels, mod.out_channels, mod.kernel_size[0], pixels)
    # upsampler and tail convs run at higher resolution: add the extra pixels
    s = model.scale if isinstance(model, fastsr.EDSR) else model.scales[scale_idx]
    tail = model.tail_conv()
    total += conv_flops(tail.in_channels, 3, 3, pixels) * (s * s - 1)
    ups = [m for m in model.upsampler(scale_idx) if isinstance(m, nn.Conv2d)]
    if len(ups) == 2:  # x4: the second x2 stage runs at 2x
        total += conv_flops(ups[1].in_channels, ups[1].out_channels, 3, pixels) * 3
    return total


@dataclass
class Workload:
    name: str
    kind: str          # "kernel" | "model" | "train"
    mode: str          # "forward" | "backward" | "full"
    shape: str
    flops: float
    bytes: float       # minimum traffic: inputs + outputs + weights, once each
    make: object       # (provider, dtype, device) -> callable or None (not applicable)


def _fresh(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone()


def _kernel_workloads(device: str, quick: bool) -> list[Workload]:
    hw = (64, 64) if quick else ((128, 128) if device == "cpu" else (256, 256))
    n = 1
    out: list[Workload] = []

    def add(name, cin, cout, k, fused_fn, ref_fn, shuffle=1, block=False):
        h, w = hw
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, cin, h, w, generator=g) * 10
        w1 = torch.randn(cout, cin, k, k, generator=g) / math.sqrt(cin * k * k)
        b1 = torch.randn(cout, generator=g)
        w2 = torch.randn(cout, cout, k, k, generator=g) / math.sqrt(cout * k * k)
        b2 = torch.randn(cout, generator=g)
        flops = conv_flops(cin, cout, k, n * h * w) * (2 if block else 1)
        nbytes_el = n * h * w * (cin + cout) + w1.numel() + (w2.numel() if block else 0)

        def make(provider, dtype, device, x=x, w1=w1, b1=b1, w2=w2, b2=b2):
            if provider in ("compile_max", "fused_graph"):
                return None
            xs = x.to(device, dtype)
            args = [t.to(device) for t in (w1, b1, w2, b2)]
            args[0], args[2] = args[0].to(dtype), args[2].to(dtype)
            if provider == "eager_nchw":
                return lambda: ref_fn(xs, *args)
            xc = xs.contiguous(memory_format=CL)
            if provider == "eager_cl":
                return lambda: ref_fn(xc, *args)
            if provider == "compile":
                f = torch.compile(ref_fn)
                return lambda: f(xc, *args)
            if provider == "fused_cpu" or (provider == "fused_triton" and device != "cuda"):
                return None  # fused_triton: a GPU row only (the interpreter is not timed); fused_cpu: == fused here
            # fused: the measured choice (fastsr.ops.dispatch); fused_triton: the Triton kernels forced.
            backend = "triton" if provider == "fused_triton" else None
            run = lambda: fused_fn(xc, *args, backend)
            run.backend = "triton" if backend else ("auto" if device == "cuda" else "cpu")
            return run

        out.append(Workload(name, "kernel", "forward", f"{n}x{cin}x{h}x{w}", flops, nbytes_el * 2, make))

    for f in ((64,) if quick else (64, 256)):
        add(f"resblock_f{f}", f, f, 3,
            lambda x, w1, b1, w2, b2, be: resblock(x, w1, b1, w2, b2, 0.1, backend=be),
            lambda x, w1, b1, w2, b2: resblock_ref(x, w1, b1, w2, b2, 0.1), block=True)
    if quick:
        return out
    add("conv3x3_relu_f64", 64, 64, 3, lambda x, w, b, w2, b2, be: conv2d(x, w, b, relu=True, backend=be),
        lambda x, w, b, w2, b2: conv2d_ref(x, w, b, relu=True))
    add("conv3x3_scale_add_f64", 64, 64, 3,
        lambda x, w, b, w2, b2, be: conv2d(x, w, b, res_scale=0.1, skip=x, backend=be),
        lambda x, w, b, w2, b2: conv2d_ref(x, w, b, res_scale=0.1, skip=x))
    for r in (2, 3):
        add(f"upsample_x{r}_f64", 64, 64 * r * r, 3,
            lambda x, w, b, w2, b2, be, r=r: conv2d(x, w, b, shuffle=r, backend=be),
            lambda x, w, b, w2, b2, r=r: conv2d_ref(x, w, b, shuffle=r))
    add("head_3_to_64", 3, 64, 3, lambda x, w, b, w2, b2, be: conv2d(x, w, b, backend=be),
        lambda x, w, b, w2, b2: conv2d_ref(x, w, b))
    add("tail_64_to_3", 64, 3, 3, lambda x, w, b, w2, b2, be: conv2d(x, w, b, backend=be),
        lambda x, w, b, w2, b2: conv2d_ref(x, w, b))
    add("mdsr_block5x5_f64", 64, 64, 5,
        lambda x, w1, b1, w2, b2, be: resblock(x, w1, b1, w2, b2, 1.0, backend=be),
        lambda x, w1, b1, w2, b2: resblock_ref(x, w1, b1, w2, b2, 1.0), block=True)
    return out


def _model_make(build, h, w, scale, mode):
    """Providers for a model workload: builds each provider's model lazily."""

    def make(provider, dtype, device):
        torch.manual_seed(0)
        x = (torch.rand(16 if mode != "forward" or h == 48 else 1, 3, h, w) * 255).to(device)
        if provider in ENGINES:
            return _engine_make(build, x, scale, provider, dtype, device, mode)
        if provider == "fused_graph" and (device != "cuda" or mode != "forward"):
            return None  # CUDA graphs: inference on a GPU only
        if (provider == "fused_triton" and device != "cuda") or (provider == "fused_cpu" and device != "cpu"):
            return None
        fused = provider in ("fused", "fused_graph", "fused_triton", "fused_cpu")
        forced = {"fused_triton": "triton", "fused_cpu": "cpu"}.get(provider)
        model = build(fused=fused, dtype=dtype if fused and dtype != torch.float32 else None,
                      backend=forced).to(device)
        if mode == "forward":
            model.eval()
        if provider in ("eager_nchw", "eager_cl", "compile", "compile_max") and dtype != torch.float32:
            model = model.to(dtype)
        if provider in ("eager_cl", "compile", "compile_max", "fused", "fused_graph", "fused_triton", "fused_cpu"):
            model = model.to(memory_format=CL)
        xin = x if (fused or dtype == torch.float32) else x.to(dtype)
        if provider != "eager_nchw":
            xin = xin.contiguous(memory_format=CL)
        kw = {"scale": scale} if isinstance(model, fastsr.MDSR) else {}
        net = model
        if provider == "compile":
            net = torch.compile(model)
        elif provider == "compile_max":
            if device != "cuda":
                return None
            net = torch.compile(model, mode="max-autotune")
        if mode == "forward":
            def run():
                with torch.inference_mode():
                    return net(xin, **kw)
            run.model = model
            if provider == "fused_graph":
                model.prepare_for_inference(cuda_graphs=True)
                run(), run()  # the second same-shape call captures: timing sees replays only
            return run
        hr = torch.rand(xin.shape[0], 3, h * scale, w * scale, device=device) * 255
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step():
            out = net(xin, **kw)
            loss = (out.float() - hr).abs().mean()
            loss.backward()
            if mode == "full":
                opt.step()
            opt.zero_grad(set_to_none=True)
        step.model = model
        # The forward alone, for the bytes it leaves for backward (not for compiled graphs:
        # their ops do not pass through the dispatch mode that counts them).
        step.forward = None if provider.startswith("compile") else (lambda: net(xin, **kw))
        return step

    return make


ENGINES = ("openvino", "onnxruntime")


def _engine_make(build, x: torch.Tensor, scale: int, provider: str, dtype: torch.dtype, device: str, mode: str):
    """The CPU inference engines users could run instead (anchors, not fastsr's speed):
    OpenVINO (fastsr's openvino backend forced: fp32 with the f32 hint, bf16) and ONNX Runtime
    (ORT_ENABLE_ALL on the exported eager graph, fp32), same weights, same threads."""
    if device != "cpu" or mode != "forward" or importlib.util.find_spec(provider) is None:
        return None
    if provider == "onnxruntime" and dtype != torch.float32:
        return None  # ORT's CPU provider has no bf16 convolutions
    model = build(backend="openvino", dtype=None if dtype == torch.float32 else dtype) if provider == "openvino" \
        else build()
    model.eval()
    kw = {"scale": scale} if isinstance(model, fastsr.MDSR) else {}
    if provider == "openvino":
        def run():
            with torch.inference_mode():
                return model(x, **kw)
        run.model = model
        return run
    import tempfile

    import onnxruntime as ort

    from fastsr.export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, f"{tmp}/model.onnx", scale=scale if kw else None)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"image": x.numpy()}
    run = lambda: session.run(None, feed)
    run.backend = "onnxruntime"
    return run


def _model_workloads(device: str, quick: bool) -> list[Workload]:
    if quick:
        sizes = [(64, 64)]
        builds = [("edsr_baseline_x2", lambda **k: fastsr.edsr_baseline(2, **k), 2)]
    else:
        sizes = [(128, 128), (256, 256)] + ([(540, 960)] if device == "cuda" else [])
        builds = [
            ("edsr_baseline_x2", lambda **k: fastsr.edsr_baseline(2, **k), 2),
            ("edsr_baseline_x4", lambda **k: fastsr.edsr_baseline(4, **k), 4),
            ("mdsr_baseline_x2", lambda **k: fastsr.mdsr_baseline(**k), 2),
        ]
        if device == "cuda":
            builds += [("edsr_x2", lambda **k: fastsr.edsr(2, **k), 2), ("edsr_x4", lambda **k: fastsr.edsr(4, **k), 4)]
        else:  # EDSR (40M params) at 128x128 takes ~20 s a call on 2 cores: only at 64x64
            builds += [("edsr_x2", lambda **k: fastsr.edsr(2, **k), 2)]
    if device == "cpu" and not quick:  # 1080p out, the size the CPU-engine comparison is quoted at
        sizes = sizes + [(540, 960)]
    out = []
    for name, build, scale in builds:
        ref = build()
        for h, w in sizes:
            if (h, w) == (540, 960) and device == "cpu" and name != "edsr_baseline_x2":
                continue  # ~3-11 s a call per provider on 2 cores: one model there is enough
            if name == "edsr_x2" and device == "cpu":
                if (h, w) != sizes[0]:
                    continue
                h, w = 64, 64
            out.append(Workload(name, "model", "forward", f"1x3x{h}x{w}", model_flops(ref, h, w), _io_bytes(ref, 1, h, w, scale),
                                _model_make(build, h, w, scale, "forward")))
    # the paper's training step: batch 16 of 48x48 LR patches
    train_builds = builds[:1]
    modes = ("full",) if quick else ("backward", "full")
    for name, build, scale in train_builds:
        ref = build()
        hh = 24 if quick else 48
        for mode in modes:
            out.append(Workload(f"train_{name}", "train", mode, f"16x3x{hh}x{hh}", 3 * model_flops(ref, hh, hh) * 16,
                                _io_bytes(ref, 16, hh, hh, scale), _model_make(build, hh, hh, scale, mode)))
    return out


def _io_bytes(model: nn.Module, n: int, h: int, w: int, scale: int) -> float:
    params = sum(p.numel() for p in model.parameters())
    return 4.0 * (params + n * 3 * h * w * (1 + scale * scale))


# ------------------------------------------------------------------------------- main


def _providers(device: str) -> list[str]:
    gpu = ["compile_max"] if device == "cuda" else []
    engines = [] if gpu else list(ENGINES)  # CPU anchors, rows only where installed
    return ["eager_nchw", "eager_cl", "compile"] + gpu + engines + ["fused"] + \
        (["fused_triton", "fused_graph"] if gpu else ["fused_cpu"])


def _dtypes(device: str) -> list[torch.dtype]:
    return [torch.float32, torch.bfloat16] + ([torch.float16] if device == "cuda" else [])


def _device(args) -> str:
    """Where this run measures: "cuda" when there is one and --cpu is not given, else "cpu"."""
    return "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"


def run(args) -> list[dict]:
    device = _device(args)
    dev_name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    if device == "cpu":
        dev_name = _cpu_name() or dev_name
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    date = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    workloads = _kernel_workloads(device, args.quick) + _model_workloads(device, args.quick)
    if args.only:
        workloads = [w for w in workloads if re.search(args.only, w.name)]
    dtypes = [d for d in _dtypes(device) if not args.dtype or str(d).split(".")[-1] in args.dtype]
    providers = [p for p in _providers(device) if not args.providers or p in args.providers]
    peaks = {d: measure_peaks(device, d) for d in dtypes}
    print(f"device: {dev_name}  torch {torch.__version__}  triton {triton_version}")
    cpu_heap = "-"
    if device == "cpu":
        # fastsr's native path keeps large buffers on glibc's heap, process-wide, at its first
        # large conv (fastsr/ops/backends/glibc_heap.py). Applied here before anything is timed,
        # so every provider of the run (eager rows included) runs with the same allocator.
        from fastsr.ops.backends import glibc_heap

        cpu_heap = "kept" if glibc_heap.keep_large_allocations() else f"glibc defaults ({glibc_heap._state['reason']})"
        print(f"allocator: large CPU buffers {cpu_heap} for every provider (FASTSR_CPU_HEAP=0: glibc's defaults)")
    for d, pk in peaks.items():
        print(f"peak ({str(d).split('.')[-1]}): {pk.label} {pk.flops / 1e12:.3f} TFLOP/s, "
              f"copy {pk.bytes_per_s / 1e9:.1f} GB/s  (measured in {pk.seconds:.1f} s)")
    printer = RowPrinter()
    printer.start()
    rows: list[dict] = []
    for wl in workloads:
        for dtype in dtypes:
            group: list[dict] = []
            made: dict = {}
            compile_times: dict[str, float] = {}
            slow = False
            for provider in providers:
                if provider.startswith("compile") and args.no_compile:
                    continue
                fn = wl.make(provider, dtype, device)
                if fn is None:
                    continue
                t0 = time.perf_counter()
                try:
                    fn()  # the first call (compiles, plans, chooses), then one warm-up call
                    _sync(device)
                    compile_times[provider] = time.perf_counter() - t0 if provider.startswith("compile") else 0.0
                    t1 = time.perf_counter()
                    fn()
                    _sync(device)
                except Exception as e:  # a provider that cannot run this case is reported, not fatal
                    print(f"  {wl.name} {provider} {dtype}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                    continue
                slow = slow or time.perf_counter() - t1 > 2.0
                made[provider] = fn
            all_times = time_interleaved(made, device, args.repeats, args.min_time, slow)
            for provider, fn in made.items():
                times = all_times[provider]
                compile_s = compile_times[provider]
                med, q25, q75 = quartiles(times)
                # An engine's buffers are its own, outside torch's allocator: not measured here.
                mem = float("nan") if provider in ENGINES else peak_memory_mb(fn, device)
                act = activation_bytes(fn.forward) / 2**20 if getattr(fn, "forward", None) else float("nan")
                backend = _backend_of(fn, provider, device)
                sec = med / 1e3
                pk = peaks[dtype]
                group.append(dict(
                    workload=wl.name, kind=wl.kind, mode=wl.mode, shape=wl.shape, provider=provider,
                    dtype=str(dtype).split(".")[-1], backend=backend, median_ms=med, q25_ms=q25, q75_ms=q75,
                    ratio_vs_fused=float("nan"), gflops=wl.flops / 1e9, tflops_per_s=wl.flops / sec / 1e12,
                    flop_frac_of_peak=wl.flops / sec / pk.flops, flop_peak_tflops=pk.flops / 1e12,
                    flop_peak_source=pk.label, gbytes=wl.bytes / 1e9, gb_per_s=wl.bytes / sec / 1e9,
                    bw_frac_of_peak=wl.bytes / sec / pk.bytes_per_s, bw_peak_gb_per_s=pk.bytes_per_s / 1e9, peak_mem_mb=mem, act_mem_mb=act, compile_s=compile_s,
                    device=dev_name, torch=torch.__version__, triton=triton_version, date=date, cpu_heap=cpu_heap,
                ))
            fused = next((r for r in group if r["provider"] == "fused"), None)
            for r in group:
                if fused:
                    r["ratio_vs_fused"] = r["median_ms"] / fused["median_ms"]
            printer.rows(group)
            rows += group
    if not args.quick and not args.no_data:
        rows += _data_rows(args, dev_name, date, triton_version)
    return rows


def _data_rows(args, dev_name: str, date: str, triton_version: str) -> list[dict]:
    """The CPU data-path ops of the C++ extension (fastsr.ext) against pure PyTorch and Pillow.

    kind "data": imresize (MATLAB bicubic) on a DIV2K-sized image, the training patch
    sampler, and the float -> uint8 output path, each timed per provider on the CPU;
    ratio_vs_fused is against the C++ ("cpp") row. FLOP columns are NaN (not conv work);
    the workload specs (and their correctness checks) live in bench/ext_bench.py.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import ext_bench
    from fastsr import ext

    if ext.load_extension() is None:
        print(f"data rows skipped: the C++ extension is unavailable ({ext.extension_status()})")
        return []
    specs = (ext_bench.bench_imresize(args.repeats * 3, False) + ext_bench.bench_patches(args.repeats, False)
             + ext_bench.bench_output(args.repeats * 3, False))
    if args.only:
        specs = [sp for sp in specs if re.search(args.only, sp["workload"])]
    nan = float("nan")
    rows = []
    for sp in specs:
        times = time_fn(sp["fn"], "cpu", sp["repeats"], sp.get("min_time_s", 0.0))
        med, q25, q75 = quartiles(times)
        rows.append(dict(
            workload=sp["workload"], kind="data", mode="forward", shape=sp["shape"], provider=sp["provider"],
            dtype="float32" if "f32" in sp["workload"] else "uint8", backend=sp["provider"], median_ms=med,
            q25_ms=q25, q75_ms=q75, ratio_vs_fused=nan, gflops=nan, tflops_per_s=nan, flop_frac_of_peak=nan,
            flop_peak_tflops=nan, flop_peak_source="", gbytes=nan, gb_per_s=nan, bw_frac_of_peak=nan,
            bw_peak_gb_per_s=nan, peak_mem_mb=nan, act_mem_mb=nan, compile_s=0.0, device=dev_name,
            torch=torch.__version__, triton=triton_version, date=date,
        ))
    cpp = {r["workload"]: r["median_ms"] for r in rows if r["provider"] == "cpp"}
    for r in rows:
        if r["workload"] in cpp:
            r["ratio_vs_fused"] = r["median_ms"] / cpp[r["workload"]]
        print(f"{r['workload']:<24} {r['shape']:<30} {r['provider']:<12} {r['median_ms']:10.2f} ms "
              f"[{r['q25_ms']:.2f}, {r['q75_ms']:.2f}]  {r['ratio_vs_fused']:6.2f}x vs cpp")
    return rows


def _backend_of(fn, provider: str, device: str) -> str:
    if provider == "fused_graph":
        return f"{fn.model.backend}+graph" if fn.model.graphs.last_replayed else "NOT-REPLAYED"
    if provider in ENGINES:
        return provider
    if provider not in ("fused", "fused_triton", "fused_cpu"):
        return {"eager_nchw": "aten", "eager_cl": "aten", "compile": "inductor", "compile_max": "inductor"}[provider]
    model = getattr(fn, "model", None)
    if model is not None:
        return model.backend or "unknown"
    return getattr(fn, "backend", "unknown")


def _cpu_name() -> str | None:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _opt(v: float, fmt: str) -> str:
    """Returns v formatted with fmt, or "" for NaN (a column that does not apply to the row)."""
    return "" if math.isnan(v) else fmt.format(v)


# One spec for the column-header line and the rows, so the two cannot drift apart:
# (title, width, alignment, cell of a row). Units live in the titles, not in every row.
ROW_FIELDS: list[tuple[str, int, str, Callable[[dict], str]]] = [
    ("workload", 24, "<", lambda r: r["workload"]),
    ("mode", 8, "<", lambda r: r["mode"]),
    ("shape", 14, "<", lambda r: r["shape"]),
    ("dtype", 8, "<", lambda r: r["dtype"]),
    ("provider", 11, "<", lambda r: r["provider"]),
    ("backend", 9, "<", lambda r: r["backend"]),
    ("median ms", 10, ">", lambda r: f"{r['median_ms']:.2f}"),
    ("[q25, q75] ms", 20, "<", lambda r: f"[{r['q25_ms']:.2f}, {r['q75_ms']:.2f}]"),
    ("t/t_fused", 9, ">", lambda r: _opt(r["ratio_vs_fused"], "{:.2f}x")),
    ("GFLOP/s", 8, ">", lambda r: f"{r['tflops_per_s'] * 1e3:.1f}"),
    ("%peak", 6, ">", lambda r: _opt(r["flop_frac_of_peak"] * 100, "{:.0f}%")),
    ("mem MB", 8, ">", lambda r: f"{r['peak_mem_mb']:.1f}"),
    ("act MB", 8, ">", lambda r: _opt(r["act_mem_mb"], "{:.1f}")),
    ("compile s", 9, ">", lambda r: f"{r['compile_s']:.1f}" if r["compile_s"] else ""),
]


def _join_cells(cells: Iterable[str]) -> str:
    """Returns the cells laid out in ROW_FIELDS' widths and alignments, trailing blanks cut."""
    return "  ".join(f"{c:{a}{w}}" for c, (_, w, a, _) in zip(cells, ROW_FIELDS)).rstrip()


def _fmt_row(r: dict) -> str:
    """Returns one result row as printed under header_line()."""
    return _join_cells(cell(r) for _, _, _, cell in ROW_FIELDS)


def header_line(lower_bound_dtypes: Sequence[str] = ()) -> str:
    """Returns the column-header line for _fmt_row's fields.

    %peak is against the measured matmul peak of the row's dtype. When some row of a dtype
    in lower_bound_dtypes reached more than 100% of it, the title reads "%peak*" and a note
    says that peak is only a lower bound: the rows are printed as measured, never clamped.
    """
    titles = [t + ("*" if t == "%peak" and lower_bound_dtypes else "") for t, _, _, _ in ROW_FIELDS]
    line = _join_cells(titles)
    if lower_bound_dtypes:
        line += (f"   (* the measured matmul peak is a lower bound for {', '.join(lower_bound_dtypes)}: "
                 "rows exceed 100% of it)")
    return line


class RowPrinter:
    """Prints the column header, then the rows group by group.

    The rows stream out as they are measured, so whether a row will exceed its dtype's peak
    is not known when the first header is printed: the header is printed again, marked,
    just before the first group that makes the peak of a further dtype a lower bound.
    """

    def __init__(self, out: Callable[[str], None] = print) -> None:
        self.out = out
        self.lower_bound: list[str] = []  # dtypes whose peak some row has exceeded

    def start(self) -> None:
        """Prints the unmarked header line (before any row is known)."""
        self.out(header_line())

    def rows(self, group: list[dict]) -> None:
        """Prints one workload/dtype group of rows, after a marked header if a row exceeds its peak."""
        new = [d for d in dict.fromkeys(r["dtype"] for r in group if r["flop_frac_of_peak"] > 1.0)
               if d not in self.lower_bound]
        if new:
            self.lower_bound += new
            self.out(header_line(self.lower_bound))
        for r in group:
            self.out(_fmt_row(r))


# ------------------------------------------------------------------------------ summary

SUMMARY_BASE = "eager_cl"
SUMMARY_LEGEND = ("summary: geometric means over the pairs of rows of this run with the same workload, mode, shape and "
                  f"dtype; speed = {SUMMARY_BASE} median / fused median (>1: fused faster), "
                  f"activation memory = fused act_mem_mb / {SUMMARY_BASE} act_mem_mb (<1: fused smaller)")
_SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _positive(v: object) -> bool:
    """Returns whether v is a finite number above 0 (a value a ratio can be taken of)."""
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def _geomean(xs: Sequence[float]) -> float:
    """Returns the geometric mean of positive numbers."""
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def _coverage(labels: Sequence[str]) -> str:
    """Returns e.g. "3 pairs: 2 kernel, 1 model" for the row labels a ratio was averaged over."""
    counts = {lab: labels.count(lab) for lab in dict.fromkeys(labels)}
    n = len(labels)
    return f"{n} pair{'s' if n != 1 else ''}: " + ", ".join(f"{c} {lab}" for lab, c in counts.items())


def summarize_vs_eager(rows: Sequence[dict], base: str = SUMMARY_BASE) -> list[str]:
    """Returns one line per (device, dtype) comparing provider "fused" with `base` (eager_cl).

    A pair is a fused row and a base row with the same device, dtype, workload, mode and
    shape. Parts, each a geometric mean over its pairs (their count and kinds in brackets):
      forward            base median / fused median over kernel and model forward rows
      training step      the same over train rows (modes backward and full)
      activation memory  fused act_mem_mb / base act_mem_mb over train rows where both are known
    A part without pairs is left out, a (device, dtype) without any part has no line; the
    device is named only when the rows come from more than one. kind "data" rows (the C++
    extension's CPU ops) have no fused provider and never pair.
    """
    def key(r: dict) -> tuple:
        return r["device"], r["dtype"], r["workload"], r["mode"], r["shape"]

    base_rows = {key(r): r for r in rows if r["provider"] == base}
    # (device, dtype) -> part -> [(ratio, label)], in the order the rows came
    parts: dict[tuple[str, str], dict[str, list[tuple[float, str]]]] = {}
    for f in rows:
        e = base_rows.get(key(f))
        if f["provider"] != "fused" or e is None or f.get("kind") == "data":
            continue
        got = parts.setdefault((f["device"], f["dtype"]), {"forward": [], "training step": [], "activation memory": []})
        train = f["kind"] == "train"
        label = f"train/{f['mode']}" if train else f["kind"]
        if _positive(f["median_ms"]) and _positive(e["median_ms"]) and (train or f["mode"] == "forward"):
            got["training step" if train else "forward"].append((e["median_ms"] / f["median_ms"], label))
        if train and _positive(f.get("act_mem_mb")) and _positive(e.get("act_mem_mb")):
            got["activation memory"].append((f["act_mem_mb"] / e["act_mem_mb"], label))
    several_devices = len({dev for dev, _ in parts}) > 1
    lines = []
    for (dev, dtype), by_part in parts.items():
        text = [f"{_geomean([x for x, _ in pairs]):.2f}x {part} ({_coverage([lab for _, lab in pairs])})"
                for part, pairs in by_part.items() if pairs]
        if text:
            where = f"{dev}, " if several_devices else ""
            lines.append(f"fused vs {base} ({where}{_SHORT_DTYPE.get(dtype, dtype)}): " + ", ".join(text))
    return lines


def write_outputs(rows: list[dict], out_dir: Path, tag: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / f"{tag}.csv", "json": out_dir / f"{tag}.json"}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in COLUMNS})
    paths["json"].write_text(json.dumps(rows, indent=1))
    png = _plot(rows, out_dir / f"{tag}.png")
    if png:
        paths["png"] = png
    return paths


def _plot(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install matplotlib)")
        return None
    rows = [r for r in rows if r["kind"] != "data"]  # no FLOPs: they stay in the table and CSV
    if not rows:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(16, 6))
    groups = sorted({(r["workload"], r["mode"], r["shape"], r["dtype"]) for r in rows})
    providers = [p for p in ("eager_nchw", "eager_cl", "compile", "compile_max", "fused_graph")
                 if any(r["provider"] == p for r in rows)]
    width = 0.8 / max(1, len(providers))
    for i, p in enumerate(providers):
        vals = []
        for g in groups:
            r = next((r for r in rows if (r["workload"], r["mode"], r["shape"], r["dtype"]) == g and r["provider"] == p), None)
            vals.append(r["ratio_vs_fused"] if r and not math.isnan(r["ratio_vs_fused"]) else 0)
        ax1.bar([j + i * width for j in range(len(groups))], vals, width, label=p)
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax1.set_xticklabels([f"{g[0]} {g[2]} {g[3]}" for g in groups], rotation=75, fontsize=6)
    ax1.set_ylabel("fused speedup (provider time / fused time)")
    ax1.legend(fontsize=7)
    ax1.set_title("speedup of fused over each provider")
    _plot_roofline(ax2, rows, providers + ["fused"])
    fig.tight_layout()
    # bbox_inches="tight": the rotated workload labels under the bar chart are not cut off
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


_DTYPE_MARKERS = {"float32": "o", "bfloat16": "^", "float16": "s"}
_ROOF_STYLES = ("-", "--", ":")


def _stack_index(placed: list[float], y: float) -> int:
    """Returns how many labels already placed lie near y (then records y), for stacking them.

    Near means within a factor 1.5 on the log axis (bf16 and fp16 peaks on a GPU, say),
    where two labels at the same spot would print over each other.
    """
    near = sum(1 for p in placed if max(p, y) / min(p, y) < 1.5)
    placed.append(y)
    return near


def _plot_roofline(ax, rows: list[dict], providers: list[str]) -> None:
    """Draws a log-log roofline on ax: each row's achieved TFLOP/s against its arithmetic
    intensity (colour: provider, marker: dtype), and per dtype the two roofs of that run,
    the measured matmul peak (horizontal) and copy bandwidth x intensity (slope 1), each
    labelled inside the axes. Returns nothing."""
    from matplotlib.lines import Line2D

    rows = [r for r in rows if _positive(r["gbytes"]) and _positive(r["tflops_per_s"])]
    if not rows:
        return
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    colors = {p: f"C{i}" for i, p in enumerate(providers)}
    for p in providers:
        for dt in dtypes:
            sel = [r for r in rows if r["provider"] == p and r["dtype"] == dt]
            if sel:
                ax.scatter([r["gflops"] / r["gbytes"] for r in sel], [r["tflops_per_s"] for r in sel],
                           color=colors[p], marker=_DTYPE_MARKERS.get(dt, "D"), s=14)
    # one row per dtype carries that dtype's peaks (every row of a dtype has the same)
    roofs = {dt: next(r for r in rows if r["dtype"] == dt) for dt in dtypes}
    peak = {dt: r["flop_peak_tflops"] for dt, r in roofs.items()}
    bw = {dt: r["bw_peak_gb_per_s"] * 1e9 / 1e12 for dt, r in roofs.items()}  # TFLOP/s per FLOP/byte
    ridge = {dt: peak[dt] / bw[dt] for dt in dtypes}  # intensity where the two roofs meet
    xs = [r["gflops"] / r["gbytes"] for r in rows] + list(ridge.values())
    ys = [r["tflops_per_s"] for r in rows] + list(peak.values())
    # limits that hold every point, both roofs' meeting point and the labels above/below them
    x0, x1 = min(xs) / 4, max(xs) * 4
    y0, y1 = min(ys + [p / 10 for p in peak.values()]) / 2, max(ys) * 3
    placed_peak: list[float] = []
    placed_bw: list[float] = []
    for i, dt in enumerate(dtypes):
        ls, name = _ROOF_STYLES[i % len(_ROOF_STYLES)], _SHORT_DTYPE.get(dt, dt)
        ax.plot([x0, x1], [peak[dt], peak[dt]], color="k", ls=ls, lw=1)
        ax.plot([x0, x1], [bw[dt] * x0, bw[dt] * x1], color="0.45", ls=ls, lw=1)
        # compute roof: labelled at the left end, where compute-bound points are not
        ax.annotate(f"{name}: {roofs[dt]['flop_peak_source']}, {peak[dt]:.3g} TFLOP/s", xy=(x0, peak[dt]),
                    xytext=(4, 2 + 9 * _stack_index(placed_peak, peak[dt])), textcoords="offset points",
                    ha="left", va="bottom", fontsize=7)
        # bandwidth roof: labelled on the slope left of the ridge, text below and right of the line
        xl = ridge[dt] / 3
        ax.annotate(f"{name}: copy {roofs[dt]['bw_peak_gb_per_s']:.0f} GB/s x intensity", xy=(xl, bw[dt] * xl),
                    xytext=(6, -2 - 9 * _stack_index(placed_bw, bw[dt] * xl)), textcoords="offset points",
                    ha="left", va="top", fontsize=7, color="0.3")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel("arithmetic intensity (FLOP / minimum byte)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title("roofline: roofs are this run's measured matmul peak and copy bandwidth")
    handles = [Line2D([], [], color=colors[p], marker="o", ls="", label=p) for p in providers
               if any(r["provider"] == p for r in rows)]
    handles += [Line2D([], [], color="k", marker=_DTYPE_MARKERS.get(dt, "D"), ls=_ROOF_STYLES[i % 3], label=dt)
                for i, dt in enumerate(dtypes)]
    ax.legend(handles=handles, fontsize=7, loc="best")  # best: the spot that hides the fewest points


def compare(rows: list[dict], old_path: Path) -> None:
    old = {(r["workload"], r["mode"], r["shape"], r["dtype"], r["provider"]): r for r in json.loads(old_path.read_text())}
    print(f"\nchange against {old_path} (new / old median; < 1 is faster now):")
    for r in rows:
        o = old.get((r["workload"], r["mode"], r["shape"], r["dtype"], r["provider"]))
        if o:
            print(f"  {r['workload']:<24} {r['mode']:<8} {r['shape']:<14} {r['dtype']:<8} {r['provider']:<11} "
                  f"{r['median_ms']:9.2f} ms vs {o['median_ms']:9.2f} ms  x{r['median_ms'] / o['median_ms']:.2f}")


def default_out_dir(environ: dict[str, str] | None = None) -> Path:
    """Returns where a run writes without --out: $FASTSR_BENCH_OUT, else ${XDG_CACHE_HOME:-~/.cache}/fastsr/bench.

    Never bench/results in the source tree by default: that folder holds the committed
    runs, and a --quick or ad-hoc run dropped there shows up as a change to commit.
    """
    env = os.environ if environ is None else environ
    if env.get("FASTSR_BENCH_OUT"):
        return Path(env["FASTSR_BENCH_OUT"]).expanduser()
    cache = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return cache / "fastsr" / "bench"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Returns the command line's options, args.out resolved (default_out_dir() unless --out is given)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small subset (about a minute on CPU)")
    p.add_argument("--only", help="regex: run only workloads whose name matches")
    p.add_argument("--dtype", nargs="*", help="subset of float32 bfloat16 float16")
    p.add_argument("--providers", nargs="*", help="subset of eager_nchw eager_cl compile compile_max openvino onnxruntime fused fused_triton "
                        "fused_cpu fused_graph")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    p.add_argument("--no-data", action="store_true",
                   help="skip the C++ data-path rows (imresize, patch sampler, uint8 output; never in --quick)")
    p.add_argument("--repeats", type=int, default=5, help="minimum timed calls per row (default 5)")
    p.add_argument("--min-time", type=float, default=1.0, help="keep timing until this many seconds (default 1)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for CSV/JSON/PNG (default $FASTSR_BENCH_OUT, else ~/.cache/fastsr/bench; "
                        "--out bench/results to add a run to the committed ones)")
    p.add_argument("--tag", help="file name stem (default: date_device)")
    p.add_argument("--compare", type=Path, help="a previous run's JSON to compare against")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is present")
    args = p.parse_args(argv)
    if args.compare and not args.compare.is_file():
        p.error(f"--compare: no such file {args.compare}")
    if args.out is None:
        args.out = default_out_dir()
    if args.quick:
        args.repeats, args.min_time = min(args.repeats, 3), min(args.min_time, 0.2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = run(args)
    if not rows:
        print("no rows: nothing matched --only/--dtype/--providers", file=sys.stderr)
        return 1
    summary = summarize_vs_eager(rows)
    print("\n" + "\n".join([SUMMARY_LEGEND] + summary) if summary
          else f"\nsummary: no fused/{SUMMARY_BASE} pairs of rows in this run")
    dev = re.sub(r"[^A-Za-z0-9]+", "-", rows[0]["device"]).strip("-")[:40]
    # The device type from what ran (the rows' device names, e.g. "NVIDIA H200", never say "cuda").
    tag = args.tag or f"{_dt.date.today().isoformat()}_{_device(args)}_{dev}" + ("_quick" if args.quick else "")
    paths = write_outputs(rows, args.out, tag)
    print(f"\nwrote {', '.join(p.name for p in paths.values())} to {args.out.resolve()}")
    if args.compare:
        compare(rows, args.compare)
    return 0


if __name__ == "__main__":
    sys.exit(main())
