"""Compile every Triton kernel launch fastsr makes for a GPU target, on a machine without one.

The tests run the kernels under the Triton interpreter, which checks the arithmetic but not
what only the GPU compiler sees: tl.dot shape and dtype rules, layouts, shared memory per
block. This script drives the real launchers (fastsr.kernels.*) on small CPU tensors with
the GPU code path selected, records each launch instead of running it, and compiles it
ahead of time for the target (default: sm_90, an H100/H200) with every configuration the
autotuner could pick. Each compiled config's shared memory is checked against the
target's per-block limit; a config over it would fail to launch on that GPU.

    python bench/compile_check.py                 # EDSR/MDSR shapes, fp32/fp16/bf16
    python bench/compile_check.py --quick         # one shape per kernel, fp16
    python bench/compile_check.py --arch 80       # another target (A100: 80)
    python bench/compile_check.py --quick --first-config   # the CI smoke test: one config each

Exit status 1 if any launch fails to compile or needs too much shared memory. It must run
without TRITON_INTERPRET=1 (it sets the GPU code path up itself).
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import sys
import time
from dataclasses import dataclass, field

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_check.py compiles for the GPU: run it without TRITON_INTERPRET=1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.runtime.autotuner as autotuner  # noqa: E402
import triton.runtime.jit as jit  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

# Shared memory a block may use, by compute capability (the opt-in maximum).
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}
_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
          torch.int64: "i64", torch.uint8: "u8", torch.int8: "i8", torch.bool: "i1"}
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@dataclass
class Launch:
    """One recorded kernel launch: the JIT function, its arguments, and the configs to try."""

    fn: jit.JITFunction
    args: tuple
    kwargs: dict
    configs: list[dict] = field(default_factory=list)  # autotuner configs (kwargs + options)


@contextlib.contextmanager
def recording(launches: list[Launch]):
    """Launches inside are recorded, not run (neither autotuned nor plain ones)."""

    def tuned_run(self, *args, **kwargs):
        configs = [{**c.kwargs, **{k: getattr(c, k) for k in _OPTIONS if getattr(c, k, None) is not None}}
                   for c in self.configs]
        launches.append(Launch(self.fn, args, {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")},
                               configs))

    def plain_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, [{}]))

    saved = autotuner.Autotuner.run, jit.JITFunction.run
    autotuner.Autotuner.run, jit.JITFunction.run = tuned_run, plain_run
    try:
        yield
    finally:
        autotuner.Autotuner.run, jit.JITFunction.run = saved


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {value!r}")


def compile_launch(launch: Launch, config: dict, arch: int):
    """Compile one launch with one config for sm_<arch>; returns the compiled kernel."""
    fn = launch.fn
    values = dict(zip(fn.arg_names, launch.args))
    values.update({k: v for k, v in {**launch.kwargs, **config}.items() if k not in _OPTIONS})
    options = {k: v for k, v in {**launch.kwargs, **config}.items() if k in _OPTIONS}
    signature, constexprs = {}, {}
    for p in fn.params:
        if p.name not in values:
            if p.default is inspect.Parameter.empty:
                raise ValueError(f"{fn.__name__}: no value for argument {p.name}")
            values[p.name] = p.default
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = values[p.name]
        else:
            signature[p.name] = _arg_type(values[p.name])
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _t(*shape, dtype):
    return torch.randn(*shape).to(dtype)


def drive(quick: bool) -> list[Launch]:
    """Call every public launcher on the shapes EDSR/MDSR use; return the recorded launches."""
    import fastsr.kernels.conv2d as conv_mod
    import fastsr.kernels.conv2d_backward as bwd_mod
    import fastsr.kernels.resblock as block_mod
    from fastsr.kernels.conv2d import conv2d_nhwc, pack_weight
    from fastsr.kernels.conv2d_backward import conv2d_backward_nhwc, resblock_backward_nhwc
    from fastsr.kernels.resblock import resblock_nhwc

    assert not conv_mod._INTERPRET and not block_mod._INTERPRET and not bwd_mod._INTERPRET
    dtypes = [torch.float16] if quick else [torch.float32, torch.float16, torch.bfloat16]
    n, h, w = 1, 8, 8
    launches: list[Launch] = []
    with recording(launches):
        for dt in dtypes:
            # (Cin, Cout, k, shuffle, relu, skip, shift): head, body, upsampler x2/x3, tail, 5x5, F=256
            convs = [(3, 64, 3, 1, False, False, True), (64, 64, 3, 1, False, True, False),
                     (64, 256, 3, 2, False, False, False), (64, 576, 3, 3, False, False, False),
                     (64, 3, 3, 1, False, False, False), (64, 64, 5, 1, True, False, False),
                     (256, 256, 3, 1, True, False, False)]
            if quick:
                convs = convs[1:3]
            for cin, cout, k, r, relu, skip, shift in convs:
                x = _t(n, h, w, cin, dtype=dt)
                wt = _t(cout, cin, k, k, dtype=dt)
                b = torch.randn(cout)
                sk = _t(n, h, w, cout, dtype=dt) if skip else None
                s = torch.randn(cin) if shift else None
                conv2d_nhwc(x, pack_weight(wt), b, k, in_shift=s, relu=relu, skip=sk, shuffle=r)
                g = _t(n, h * r, w * r, cout // (r * r), dtype=dt)
                conv2d_backward_nhwc(g, x, wt, b, k, in_shift=s, relu=relu, shuffle=r)
            for c, k in ([(64, 3)] if quick else [(64, 3), (64, 5), (128, 3)]):
                x = _t(n, h, w, c, dtype=dt)
                w1, w2 = _t(c, c, k, k, dtype=dt), _t(c, c, k, k, dtype=dt)
                b1, b2 = torch.randn(c), torch.randn(c)
                resblock_nhwc(x, pack_weight(w1), b1, pack_weight(w2), b2, k, 0.1)
                resblock_backward_nhwc(_t(n, h, w, c, dtype=dt), x, w1, b1, w2, k, 0.1)
    return launches


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one shape per kernel, fp16 only")
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    p.add_argument("--first-config", action="store_true", help="only the first autotune config of each launch")
    args = p.parse_args(argv)
    limit = SMEM_LIMIT.get(args.arch, 99 * 1024)
    launches = drive(args.quick)
    # Launches that differ only in runtime values compile to the same kernel: dedupe.
    seen, failures, total, t0 = set(), 0, 0, time.perf_counter()
    for launch in launches:
        for config in launch.configs[:1] if args.first_config else launch.configs:
            consts = {**launch.kwargs, **config}
            types = tuple(_arg_type(a) for a in launch.args if isinstance(a, torch.Tensor))
            key = (launch.fn.__name__, types, tuple(sorted(consts.items(), key=lambda kv: kv[0])))
            if key in seen:
                continue
            seen.add(key)
            total += 1
            what = f"{launch.fn.__name__} {types[0] if types else ''} " + " ".join(
                f"{k}={v}" for k, v in sorted(consts.items()) if k.isupper() or k in _OPTIONS)
            try:
                kernel = compile_launch(launch, config, args.arch)
            except Exception as e:  # a compile error is the finding: report it, go on
                failures += 1
                print(f"FAIL  {what}\n      {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")
                continue
            smem = kernel.metadata.shared
            status = "ok  " if smem <= limit else "SMEM"
            failures += smem > limit
            print(f"{status}  {smem / 1024:6.1f} KiB  {what}")
    print(f"\n{total} kernel configs compiled for sm_{args.arch} in {time.perf_counter() - t0:.0f} s: "
          f"{failures} problem(s) (shared memory limit {limit // 1024} KiB per block)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
