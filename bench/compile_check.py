"""Compile every Triton kernel launch fastsr makes for a GPU target, on a machine without one,
and read the machine code.

The tests run the kernels under the Triton interpreter, which checks the arithmetic but not
what only the GPU compiler sees: tl.dot shape and dtype rules, layouts, shared memory per
block, and what the code the GPU runs looks like. This script records launches instead of
running them (on CPU tensors, with the GPU code path selected: the kernels are imported without
TRITON_INTERPRET) and compiles each ahead of time for the target (default sm_90, an H100/H200)
with every configuration its autotuner may pick.

Each compile gets the specialization Triton's JIT gives real CUDA arguments: the JIT's own
argument binder (triton.runtime.jit.create_function_from_signature) is run on the recorded
arguments, with every tensor standing in as a CUDA pointer at 256-byte-aligned base + its
storage offset (the CUDA caching allocator hands out 512-byte-aligned blocks). So pointers and
integers divisible by 16 get tt.divisibility=16 and integers equal to 1 become constexprs,
exactly as at a real launch; without that, the 64 -> 64 conv compiles to scalar 2-byte loads
that no GPU launch would ever run.

Two ways to drive it:

    python bench/compile_check.py                 # a kernel sweep: EDSR/MDSR shapes, fp32/fp16/bf16
    python bench/compile_check.py --quick --first-config   # its small form
    python bench/compile_check.py --model edsr_baseline --scale 2 --lr-size 540x960 \\
        --dtype bfloat16 --emit DIR               # one model: cubins, manifest, SASS report

--model drives the model itself (fused=True, backend="triton"): one inference forward at batch
1 and the LR size, and one training step (--train-batch 16 of --train-patch 48x48 LR patches,
L1 loss, forward and backward), so the list of launches is what the model launches. With
--emit DIR it writes DIR/manifest.json ({"arch", "kernels": [{"name", "role", "config",
"cubin", ...}], "launches": [...]}), the cubins under DIR/cubins/, and DIR/sass_report.json
and .txt: one row per kernel and config, read from the cubin with the nvdisasm / cuobjdump
that Triton's package carries (bench/static_model.py reads the manifest and the report).

Exit status 1 if any launch fails to compile, needs more shared memory than the target's
per-block limit, or (--check-wide-loads) a body conv has no 16-byte operand load. It must run
without TRITON_INTERPRET=1 (it sets the GPU code path up itself).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_check.py compiles for the GPU: run it without TRITON_INTERPRET=1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.runtime.autotuner as autotuner  # noqa: E402
import triton.runtime.jit as jit  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# Shared memory a block may use, by compute capability (the opt-in maximum).
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_FORM_FLAGS = ("RESIDENT_W", "ROLL_ROWS")  # boolean config keys that pick a kernel's main-loop form

# What one SM of an H200 holds (all sm_90 parts: H100 and H200 share the SM): the CTAs-per-SM
# column is computed against these.
H200 = dict(sms=132, regs_per_sm=65536, smem_per_sm=228 * 1024, threads_per_sm=2048, ctas_per_sm=32,
            reg_alloc_unit=256)
# A CUDA allocation's alignment as the JIT sees it (cudaMalloc guarantees 256 bytes; the
# caching allocator's blocks are multiples of 512): only alignment mod 16 matters to the JIT.
CUDA_ALLOC_ALIGN = 256
_FAKE_DEVICE_BASE = CUDA_ALLOC_ALIGN << 32  # the stand-in device address of every storage

# The model sizes the issue asks for: inference at batch 1, a paper-recipe training step.
TRAIN_BATCH, TRAIN_PATCH = 16, (48, 48)
ROLES = ("head", "body", "block", "upsampler", "tail", "dgrad", "wgrad", "reduce", "pad", "other")


# ------------------------------------------------------------------------------ recording


@dataclass
class Launch:
    """One recorded kernel launch: the JIT function, its arguments, and the configs to try."""

    fn: jit.JITFunction
    args: tuple
    kwargs: dict
    configs: list[dict] = field(default_factory=list)  # autotuner configs (kwargs + options)
    grid: Any = None                                   # the launch grid: a tuple, or a callable of the meta
    phase: str = ""                                    # "inference", "train.forward", "train.backward", or ""
    launcher: str = ""                                 # the fastsr.kernels function that launched it
    callers: tuple[str, ...] = ()                      # the fastsr.kernels functions on the stack
    pre_hooks: list = field(default_factory=list)      # each config's pre_hook (or None), as configs
    # A residual block's two candidates (block_candidates): "triton_block" on the block launch,
    # "triton_convs" on the two conv launches recorded beside it, which point at it by index.
    candidate: str = ""
    alternative_of: int | None = None

    def pre_hook(self, config: dict):
        """The autotune config's pre_hook (the TMA conv re-boxes its descriptors for BLOCK_M)."""
        for c, hook in zip(self.configs, self.pre_hooks):
            if c == config:
                return hook
        return None


# The public launchers in fastsr.kernels; the innermost one on the stack made the launch.
_LAUNCHERS = ("conv2d_nhwc", "resblock_nhwc", "conv2d_dgrad_nhwc", "conv2d_wgrad_nhwc",
              "conv2d_backward_nhwc", "resblock_backward_nhwc", "conv2d_head_nhwc")


def _kernel_callers() -> tuple[str, ...]:
    """The fastsr.kernels launchers on the current stack, innermost first."""
    names = []
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name in _LAUNCHERS and "kernels" in frame.f_code.co_filename:
            names.append(frame.f_code.co_name)
        frame = frame.f_back
    return tuple(names)


class Recorder:
    """Collects launches; `phase` labels the ones made while it is set. `torch_ops` collects
    the PyTorch (non-Triton) ops that do device work between them (see TorchOps)."""

    def __init__(self) -> None:
        self.launches: list[Launch] = []
        self.torch_ops: list[dict] = []
        self.phase = ""
        self.candidate, self.alternative_of = "", None  # set by block_candidates while it records

    def add(self, fn, args, kwargs, configs, grid, pre_hooks=()) -> None:
        callers = _kernel_callers()
        self.launches.append(Launch(fn, args, kwargs, configs, grid, self.phase,
                                    callers[0] if callers else "", callers, list(pre_hooks),
                                    self.candidate, self.alternative_of))


@contextlib.contextmanager
def recording(launches: list[Launch] | Recorder) -> Iterator[Recorder]:
    """Launches inside are recorded, not run (neither autotuned nor plain ones)."""
    rec = launches if isinstance(launches, Recorder) else Recorder()
    if not isinstance(launches, Recorder):
        rec.launches = launches

    def tuned_run(self, *args, grid=None, warmup=False, **kwargs):
        # The configs the autotuner would time: after its early prune, where it has one.
        cfgs = self.configs
        if getattr(self, "early_config_prune", None):
            cfgs = self.early_config_prune(self.configs, dict(zip(self.arg_names, args)), **kwargs)
        configs = [{**c.kwargs, **{k: getattr(c, k) for k in _OPTIONS if getattr(c, k, None) is not None}}
                   for c in cfgs]
        rec.add(self.fn, args, kwargs, configs, grid, [c.pre_hook for c in cfgs])

    def plain_run(self, *args, grid, warmup, **kwargs):
        rec.add(self, args, kwargs, [{}], grid)

    saved = autotuner.Autotuner.run, jit.JITFunction.run
    autotuner.Autotuner.run, jit.JITFunction.run = tuned_run, plain_run
    try:
        yield rec
    finally:
        autotuner.Autotuner.run, jit.JITFunction.run = saved


# Ops that allocate or describe memory without a kernel (a view shares its input's storage and
# is found by that; these make fresh storage without writing it).
_NO_KERNEL = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh",
              "set_", "resize_", "detach", "alias", "_local_scalar_dense", "is_same_size")


class TorchOps(TorchDispatchMode):
    """Records the aten ops of a forward/backward that would be CUDA kernels of their own: not
    the Triton launches (recorded by `recording`), not views, not bare allocations. Each entry:
    phase, op, bytes read and written (its tensor inputs and outputs once), output shapes, and
    how many Triton launches came before it. A registered fastsr op is not an entry (its
    work is its Triton launches); the aten ops inside its body are seen where the op's body
    runs directly (inference without gradients bypasses the dispatcher) and missed where the
    dispatcher runs the op (with autograd: a mode is off while its own handler runs), so a
    training step's count is a lower bound."""

    def __init__(self, rec: Recorder) -> None:
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.namespace == "fastsr" or name in _NO_KERNEL:
            return out
        ins = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not outs:
            return out
        in_storage = {t.untyped_storage().data_ptr() for t in ins}
        if not name.endswith("_") and all(t.untyped_storage().data_ptr() in in_storage for t in outs):
            return out  # a view, or an op that handed its input back (contiguous() of a contiguous tensor)
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        self.rec.torch_ops.append(dict(phase=self.rec.phase, op=f"{func.namespace}.{name}", after_launch=len(
            self.rec.launches), bytes_read=nbytes(ins), bytes_written=nbytes(outs),
            shapes=[list(t.shape) for t in outs], dtypes=[str(t.dtype).replace("torch.", "") for t in outs]))
        return out


@contextlib.contextmanager
def gpu_code_path(sms: int = H200["sms"], arch: int = 90) -> Iterator[None]:
    """Let the fused ops take the Triton backend's GPU path on CPU tensors, for recording.

    The kernels chose their code path at import (TRITON_INTERPRET unset: the GPU one); only
    the dispatcher's gate (which lets CPU tensors through to Triton only under the interpreter)
    is opened here, and the launchers size their persistent grids and split-K for `sms`
    multiprocessors (an H200's 132) instead of the 64 they assume off a GPU, the kernels that
    need TMA (compute capability >= 9.0: kernels/conv2d_tma.py) are selected exactly when `arch`
    has it, and the fused plan lays its weights out as it does on CUDA."""
    import fastsr.kernels._common as common
    import fastsr.ops.dispatch as dispatch

    if common._INTERPRET:
        raise RuntimeError("fastsr.kernels was imported under TRITON_INTERPRET=1: no GPU code path to record")
    import fastsr.models.fused as fused

    saved = dispatch.triton_interpreting, common._multiprocessor_count, fused._plan_weight, common._has_tma
    dispatch.triton_interpreting = lambda: True
    common._multiprocessor_count = lambda device: sms
    common._has_tma = lambda device: arch >= 90
    # The fused plan keeps weights in the kernels' packed layout on CUDA (the per-call pack
    # is then a free view), in the usual one on the CPU: take the CUDA branch.
    fused._plan_weight = fused.kernel_layout
    try:
        yield
    finally:
        dispatch.triton_interpreting, common._multiprocessor_count, fused._plan_weight, common._has_tma = saved


# The one-launch residual block's kernels (kernels/resblock.py: the pointer form and the TMA form).
BLOCK_KERNELS = ("_resblock_nhwc_kernel", "_resblock_tma_kernel")
# Copies into a bordered, channel-padded layout that a conv then reads with 16-byte loads.
PAD_KERNELS = ("_pad_bordered_kernel",)  # kernels/pad.py


@contextlib.contextmanager
def block_candidates(rec: Recorder) -> Iterator[None]:
    """Record both candidates the measured dispatch (fastsr/ops/dispatch.py) times for each
    residual block: the one-launch block ("triton_block", what backend="triton" runs here, marked
    on its launch) and, right after it, the two conv launches "triton_convs" would run instead
    (conv1 + b1 + ReLU, then conv2 + b2, * res_scale, + x: fastsr.ops.backends.triton.resblock_convs
    on the kernels' layout), each with `alternative_of` = the block launch's index. The
    alternatives are extra records, not part of the model's launch sequence: bench/static_model.py
    predicts both and counts the lower, as the dispatch would pick by timing on a GPU."""
    import fastsr.kernels.resblock as resblock
    from fastsr.kernels.conv2d import conv2d_nhwc

    orig = resblock.resblock_nhwc
    sig = inspect.signature(orig)

    def with_candidates(*args, **kwargs):
        before = len(rec.launches)
        result = orig(*args, **kwargs)
        if rec.candidate or len(rec.launches) != before + 1 or rec.launches[-1].fn.__name__ not in BLOCK_KERNELS:
            return result  # nothing launched (an empty input), or not a block launch
        a = sig.bind(*args, **kwargs)
        a.apply_defaults()
        a = a.arguments
        rec.launches[-1].candidate = "triton_block"
        rec.candidate, rec.alternative_of = "triton_convs", len(rec.launches) - 1
        try:
            t = conv2d_nhwc(a["x"], a["w1_packed"], a["b1"], a["kernel_size"], relu=True)
            conv2d_nhwc(t, a["w2_packed"], a["b2"], a["kernel_size"], res_scale=a["res_scale"], skip=a["x"])
        finally:
            rec.candidate, rec.alternative_of = "", None
        return result

    # The model's backend imports the launcher at each call (fastsr/ops/backends/triton.py).
    resblock.resblock_nhwc = with_candidates
    try:
        yield
    finally:
        resblock.resblock_nhwc = orig


# ----------------------------------------------------------------- the JIT's specialization


class _DevicePointer:
    """A tensor as the JIT's specializer sees a CUDA argument: its dtype and an address.

    The address is a 256-byte-aligned base plus the tensor's storage offset in bytes: what a
    tensor of that storage layout has on a GPU (a view into the middle of a buffer stays
    unaligned, as it would be there)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.dtype = t.dtype
        self._ptr = _FAKE_DEVICE_BASE + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._ptr


@dataclass
class Specialized:
    """What the JIT would hand triton.compile for one launch and config."""

    signature: dict
    constexprs: dict
    attrs: dict
    options: dict

    def divisible(self, fn: jit.JITFunction) -> list[str]:
        """Names of the arguments marked tt.divisibility=16."""
        names = [p.name for p in fn.params]
        return [names[path[0]] for path, a in self.attrs.items() if any(x[0] == "tt.divisibility" for x in a)]

    def constant_ints(self, fn: jit.JITFunction) -> list[str]:
        """Runtime (non-constexpr) parameters the JIT turned into constexprs (integers equal to 1)."""
        return [p.name for p in fn.params if not p.is_constexpr and self.signature.get(p.name) == "constexpr"]


_BACKENDS: dict[int, Any] = {}


def _backend(arch: int):
    if arch not in _BACKENDS:
        _BACKENDS[arch] = make_backend(GPUTarget("cuda", arch, 32))
    return _BACKENDS[arch]


def specialize(launch: Launch, config: dict, arch: int, jit_attrs: bool = True) -> Specialized:
    """Run the installed Triton's own JIT binder on the launch's arguments (tensors as CUDA
    pointers) and pack its result the way JITFunction.run does before compiling.

    jit_attrs=False drops what the binder derived from the values (divisibility, integers
    equal to 1 as constexprs): the compile this script did before 2026-12-02, which no launch
    on a GPU gets; kept to show the difference (--no-specialize)."""
    fn, backend = launch.fn, _backend(arch)
    binder = jit.create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**launch.kwargs, **config}
    args = _config_args(launch, config)
    # A host TensorDescriptor specializes as its type alone ("tensordesc<bf16[1, 1, 128, 64]>":
    # dtype and block shape); the binder reads no address from it (the runtime builds the
    # CUtensorMap from the base at launch), so its base can stay the recorded CPU tensor.
    args = [_DevicePointer(a) if isinstance(a, torch.Tensor) else a for a in args]
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    if not jit_attrs:
        attrs = {path: [] for path in attrs}
        for i, p in enumerate(fn.params):
            if not p.is_constexpr and signature[p.name] == "constexpr":  # an int equal to 1
                signature[p.name] = "i32"
                constexprs.pop((i,), None)
    return Specialized(signature, constexprs, attrs, options.__dict__)


def _config_args(launch: Launch, config: dict) -> list:
    """The launch's positional arguments as the kernel sees them under `config`: where the config
    has a pre_hook (it sets the descriptors' block shapes for its BLOCK_M), it runs on copies of
    the descriptors with the config's values, as the autotuner runs it before each launch."""
    hook = launch.pre_hook(config)
    if hook is None:
        return list(launch.args)
    names = [p.name for p in launch.fn.params]
    args = [dataclasses.replace(a) if isinstance(a, TensorDescriptor) else a for a in launch.args]
    copies = {}
    for i, a in enumerate(args):  # one copy per descriptor object (skip and out may share one)
        if isinstance(a, TensorDescriptor):
            args[i] = copies.setdefault(id(launch.args[i]), a)
    nargs = {**dict(zip(names, args)), **launch.kwargs, **{k: v for k, v in config.items() if k not in _OPTIONS}}
    hook(nargs)
    return [nargs[n] for n in names[:len(args)]]


def compile_launch(launch: Launch, config: dict, arch: int, spec: Specialized | None = None):
    """Compile one launch with one config for sm_<arch> as the JIT would; returns
    (compiled kernel, ptxas log text)."""
    spec = spec or specialize(launch, config, arch)
    src = ASTSource(fn=launch.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
    # ptxas -v's report (stack frame, spill bytes, registers) is only printed, not returned:
    # inside ptxas_reports() Triton prints it (and compiles even on a cache hit, which would
    # skip ptxas), and this thread's prints are kept.
    with _captured_stdout() as log:
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=spec.options)
    return kernel, log.getvalue()


@contextlib.contextmanager
def ptxas_reports() -> Iterator[None]:
    """Inside, every compile runs ptxas (even on a Triton cache hit) and prints its -v report,
    which compile_launch keeps. Set once around all the compiles: the knobs are global, so
    setting and restoring them per compile would race between compile threads."""
    knobs = triton.knobs
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log = knobs.compilation.always_compile = True
    try:
        yield
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved


class _PerThreadStdout(io.TextIOBase):
    """sys.stdout while compiles run in threads: each thread's prints go to its own buffer
    (contextlib.redirect_stdout swaps one global, so parallel compiles would mix their logs
    and lose the real stdout)."""

    def __init__(self, real) -> None:
        self.real, self.buffers = real, {}

    def write(self, text: str) -> int:
        buf = self.buffers.get(threading.get_ident())
        return (buf if buf is not None else self.real).write(text)

    def flush(self) -> None:
        self.real.flush()


_STDOUT_LOCK = threading.Lock()


@contextlib.contextmanager
def _captured_stdout() -> Iterator[io.StringIO]:
    """This thread's prints, kept (other threads print as usual)."""
    with _STDOUT_LOCK:
        if not isinstance(sys.stdout, _PerThreadStdout):
            sys.stdout = _PerThreadStdout(sys.stdout)
        router = sys.stdout
    buf = router.buffers[threading.get_ident()] = io.StringIO()
    try:
        yield buf
    finally:
        with _STDOUT_LOCK:
            del router.buffers[threading.get_ident()]
            if not router.buffers and sys.stdout is router:
                sys.stdout = router.real


# --------------------------------------------------------------------------- reading SASS


def _nvidia_tool(name: str) -> str:
    """Path of a CUDA binary tool shipped inside Triton's NVIDIA backend."""
    import triton.backends.nvidia as nv

    path = Path(nv.__file__).parent / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: this Triton build does not ship {name}")
    return str(path)


_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
# Integer arithmetic and predicate instructions: the address and mask work that competes with
# the MMAs for issue slots in a hot loop (moves, loads, barriers and MMAs are not counted).
_INT_OPS = {"IADD3", "IADD", "IADD32I", "IMAD", "IMUL", "IMUL32I", "IMNMX", "VIMNMX", "VIADD", "VIADDMNMX",
            "IABS", "LEA", "LOP3", "LOP", "LOP32I", "SHF", "SHL", "SHR", "SEL", "ISETP", "ISCADD", "FLO",
            "POPC", "BMSK", "BREV", "SGXT", "PRMT", "IDP", "IMMA_NOT", "UIADD3", "UIMAD", "ULEA", "ULOP3",
            "USHF", "USEL", "UISETP", "UIMNMX", "USGXT", "UPRMT", "UFLO", "UPOPC", "UBMSK", "UBREV", "ULOP",
            "USHL", "USHR", "UIADD3", "UIMAD", "UIABS", "VIADD"}
_PRED_OPS = {"PLOP3", "PSETP", "P2R", "R2P", "UPLOP3", "UPSETP", "UP2UR", "UR2UP", "VOTE", "VOTEU"}
_HGMMA_SHAPE = re.compile(r"HGMMA\.(\d+x\d+x\d+)")
_WIDTH = re.compile(r"\.(128|64|32|U16|S16|U8|S8)\b")
_WIDTH_BYTES = {"128": 16, "64": 8, "32": 4, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def _access_bytes(opcode: str) -> int:
    """Bytes per thread of a global memory instruction: LDG.E.128 -> 16, LDG.E -> 4, ...
    (LDGSTS.E.BYPASS.LTC128B.128: the .LTC128B is a cache hint, the last width is the size)."""
    widths = [_WIDTH_BYTES[w] for w in _WIDTH.findall(opcode.replace("LTC128B", ""))]
    return widths[-1] if widths else 4


def _base(opcode: str) -> str:
    return opcode.split(".")[0]


def parse_sass(text: str) -> list[dict]:
    """nvdisasm output -> [{"addr", "op", "opcode", "label"}] in program order (labels ride on
    the next instruction)."""
    out, label = [], None
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            label = m.group(1)
            continue
        m = _SASS_LINE.match(line)
        if m:
            out.append(dict(addr=int(m.group(1), 16), opcode=m.group(3), op=_base(m.group(3)),
                            operands=m.group(4), label=label))
            label = None
    return out


def _loops(instrs: list[dict]) -> list[tuple[int, int]]:
    """(first, last) instruction indices of every loop: a branch back to an earlier label."""
    where = {ins["label"]: i for i, ins in enumerate(instrs) if ins["label"]}
    loops = []
    for i, ins in enumerate(instrs):
        if ins["op"] == "BRA":
            m = _BRANCH_TARGET.search(ins["operands"])
            if m and m.group(1) in where and where[m.group(1)] <= i:
                loops.append((where[m.group(1)], i))
    return loops


def sass_facts(instrs: list[dict]) -> dict:
    """What the issue's SASS table reports, from a disassembled kernel."""
    ops = [ins["op"] for ins in instrs]
    count = {op: ops.count(op) for op in set(ops)}
    mma = "HGMMA" if count.get("HGMMA") else "HMMA" if count.get("HMMA") else "none"
    loads = [ins for ins in instrs if ins["op"] in ("LDG", "LDGSTS")]
    stores = [ins for ins in instrs if ins["op"] == "STG"]
    ldg_widths = [_access_bytes(i["opcode"]) for i in loads if i["op"] == "LDG"]
    cp_widths = [_access_bytes(i["opcode"]) for i in loads if i["op"] == "LDGSTS"]
    st_widths = [_access_bytes(i["opcode"]) for i in stores]
    # The hot loop: of the innermost loops that issue MMAs (HGMMA, else HMMA, else FFMA), the
    # one with the most of them. Innermost: no other MMA loop nested inside it.
    mma_op = mma if mma != "none" else "FFMA"
    with_mma = [(a, b) for a, b in _loops(instrs) if any(instrs[k]["op"] == mma_op for k in range(a, b + 1))]
    inner = [(a, b) for a, b in with_mma
             if not any((c, d) != (a, b) and a <= c and d <= b for c, d in with_mma)]
    unrolled = not inner and count.get(mma_op, 0) > 0
    if unrolled:  # the MMA loop was fully unrolled: its span, first MMA to last, is the hot code
        at = [k for k, ins in enumerate(instrs) if ins["op"] == mma_op]
        inner = [(at[0], at[-1])]
    loops = []
    for a, b in inner:
        body = [ins["op"] for ins in instrs[a:b + 1]]
        n_mma = sum(op == mma_op for op in body)
        n_int = sum(op in _INT_OPS for op in body)
        n_pred = sum(op in _PRED_OPS for op in body)
        # The operands' global loads: the loop's; in a fully unrolled kernel (one K step, the
        # head) the MMAs' operands are all loaded before the last MMA, so everything up to it.
        span = instrs[a:b + 1] if not unrolled else instrs[:b + 1]
        load_w = [_access_bytes(ins["opcode"]) for ins in span if ins["op"] in ("LDG", "LDGSTS")]
        loops.append(dict(instructions=len(body), mma=n_mma, int_ops=n_int, pred_ops=n_pred,
                          int_pred_per_mma=round((n_int + n_pred) / n_mma, 1), addr=instrs[a]["addr"],
                          unrolled=unrolled, widest_load=max(load_w, default=0),
                          narrowest_load=min(load_w, default=0),
                          loads_by_width={str(w): load_w.count(w) for w in sorted(set(load_w))},
                          tma_loads=sum(ins["op"] == "UTMALDG" for ins in span)))
    hot = max(loops, key=lambda lp: (lp["mma"], lp["int_pred_per_mma"]), default=None)
    # wgmma shape (m64nNk16) and where its A operand lives: "gdesc" first = A and B both
    # from shared memory (a descriptor), a register first = A from registers.
    shapes = [(m.group(1), ins["operands"].split(",")[1].strip().startswith("gdesc"))
              for ins in instrs if ins["op"] == "HGMMA" for m in [_HGMMA_SHAPE.match(ins["opcode"])] if m]
    common = max(set(shapes), key=shapes.count) if shapes else None
    return dict(
        mma=mma, hgmma=count.get("HGMMA", 0), hmma=count.get("HMMA", 0), ffma=count.get("FFMA", 0),
        instructions=len(instrs),
        ldl=count.get("LDL", 0), stl=count.get("STL", 0),
        tma_loads=count.get("UTMALDG", 0), tma_stores=count.get("UTMASTG", 0),
        cp_async=count.get("LDGSTS", 0), cp_async_bulk=count.get("UBLKCP", 0),
        ldg=len(ldg_widths), stg=len(st_widths),
        widest_ldg=max(ldg_widths, default=0), widest_cp_async=max(cp_widths, default=0),
        widest_load=max(ldg_widths + cp_widths, default=0), widest_store=max(st_widths, default=0),
        narrowest_store=min(st_widths, default=0),
        loads_by_width={str(w): (ldg_widths + cp_widths).count(w) for w in sorted(set(ldg_widths + cp_widths))},
        stores_by_width={str(w): st_widths.count(w) for w in sorted(set(st_widths))},
        hot_loop_widest_load=hot["widest_load"] if hot else None,
        hot_loop_narrowest_load=hot["narrowest_load"] if hot else None,
        hot_loop_loads_by_width=hot["loads_by_width"] if hot else None,
        hot_loop_tma_loads=hot["tma_loads"] if hot else None,
        hgmma_shape=common[0] if common else None, hgmma_a_from_smem=common[1] if common else None,
        hot_loop_mma=mma_op if hot else None,
        int_pred_per_hgmma=hot["int_pred_per_mma"] if hot and mma_op == "HGMMA" else None,
        hot_loop=hot, mma_loops=loops,
    )


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ctas_per_sm(regs: int, warps: int, smem: int, sm: dict = H200) -> dict:
    """Resident CTAs per SM and what limits them: registers (allocated per warp in units of
    256), shared memory (the kernel's dynamic + static bytes, the 1 KiB per-CTA reserve being
    part of the static figure on sm_90), threads, and the 32-CTA cap."""
    per_warp = -(-max(regs, 1) * 32 // sm["reg_alloc_unit"]) * sm["reg_alloc_unit"]
    limits = dict(regs=sm["regs_per_sm"] // (per_warp * warps),
                  smem=sm["smem_per_sm"] // smem if smem else sm["ctas_per_sm"],
                  threads=sm["threads_per_sm"] // (32 * warps), cap=sm["ctas_per_sm"])
    n = min(limits.values())
    return dict(ctas=n, limited_by=[k for k, v in limits.items() if v == n])


def cubin_report(cubin: bytes, work: Path, ptxas_log: str, dynamic_smem: int, warps: int) -> dict:
    """The SASS table's row for one cubin (written to `work` for the tools)."""
    work.parent.mkdir(parents=True, exist_ok=True)
    work.write_bytes(cubin)
    sass = subprocess.run([_nvidia_tool("nvdisasm"), "-c", str(work)], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([_nvidia_tool("cuobjdump"), "-res-usage", str(work)], capture_output=True, text=True,
                         check=True).stdout
    m = _RES.search(res)
    regs, stack, static_smem, local = (int(g) for g in m.groups()) if m else (0, 0, 0, 0)
    facts = sass_facts(parse_sass(sass))
    s = _PTXAS_SPILL.search(ptxas_log)
    smem = dynamic_smem + static_smem
    # ptxas's C7514: it serialized the wgmmas (a wait after every one), because other
    # instructions read an accumulator while a wgmma on it may be in flight (e.g. register moves
    # of a loop-carried accumulator). Said only in the log, never in the SASS's shape.
    facts["wgmma_serialized"] = "C7514" in ptxas_log
    return dict(regs=regs, stack_bytes=stack, local_bytes=local,
                spill_store_bytes=int(s.group(2)) if s else None, spill_load_bytes=int(s.group(3)) if s else None,
                smem_bytes=smem, smem_dynamic=dynamic_smem, smem_static=static_smem,
                **ctas_per_sm(regs, warps, smem), **facts), sass


# ------------------------------------------------------------------------------------ roles


def role_of(launch: Launch, spec: Specialized, image_channels: int = 3) -> str:
    """The launch's job in the network (the manifest's `role`), from the kernel and how it
    was called: the one-launch block, dgrad (the dgrad kernel, and the forward kernel where
    the block's backward runs it for dx), wgrad and its reduction; a forward conv by its shape:
    image -> F is the head, F -> image the tail, a pixel shuffle in its epilogue the upsampler
    (with the tail's job too when it also writes the image), else an F -> F body conv."""
    name = launch.fn.__name__
    c = spec.constexprs
    get = {launch.fn.params[path[0]].name: v for path, v in c.items()}.get
    if name in BLOCK_KERNELS:
        return "block"
    if name == "_dgrad_kernel":
        return "dgrad"
    if name == "_wgrad_kernel":
        return "wgrad"
    if name == "_wgrad_reduce_kernel":
        return "reduce"
    if name in PAD_KERNELS:
        return "pad"  # a layout copy feeding a conv's 16-byte operand loads (no MMA)
    if name not in ("_conv2d_nhwc_kernel", "_conv2d_tma_kernel", "_conv2d_head_kernel"):
        return "other"
    if launch.launcher == "conv2d_nhwc" and "resblock_backward_nhwc" in launch.callers and get("HAS_SKIP"):
        return "dgrad"  # dx = conv(dh, flipped W1) + dy: the block's last backward step
    c_in, c_out, r = get("C_IN"), get("C_OUT"), get("SHUFFLE")
    jobs = []
    if c_in == image_channels:
        jobs.append("head")
    if r and r > 1:
        jobs.append("upsampler")
    if c_out // (r or 1) ** 2 == image_channels:
        jobs.append("tail")
    return "+".join(jobs) or "body"


# ---------------------------------------------------------------------------------- drivers


def _t(*shape, dtype):
    return torch.randn(*shape).to(dtype)


def drive(quick: bool, arch: int = 90) -> list[Launch]:
    """Call every public launcher on the shapes EDSR/MDSR use; return the recorded launches."""
    from fastsr.kernels.conv2d import conv2d_nhwc, pack_weight
    from fastsr.kernels.conv2d_backward import conv2d_backward_nhwc
    from fastsr.kernels.conv2d_head import conv2d_head_nhwc, head_conv_supported
    from fastsr.kernels.resblock_backward import resblock_backward_nhwc
    from fastsr.kernels.resblock import resblock_nhwc

    dtypes = [torch.float16] if quick else [torch.float32, torch.float16, torch.bfloat16]
    # 16x16: sizes a real input has (the JIT specializes on divisibility by 16), small on CPU.
    n, h, w = 2, 16, 16
    rec = Recorder()
    with gpu_code_path(arch=arch), recording(rec):
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
                conv2d_nhwc(x, pack_weight(wt, r), b, k, in_shift=s, relu=relu, skip=sk, shuffle=r)
                if head_conv_supported(cin, k, skip=sk, shuffle=r):  # the model's head: features in bf16
                    conv2d_head_nhwc(x, pack_weight(wt), b, k, in_shift=s, relu=relu,
                                     out_dtype=torch.bfloat16 if dt == torch.float32 else dt)
                g = _t(n, h * r, w * r, cout // (r * r), dtype=dt)
                conv2d_backward_nhwc(g, x, wt, b, k, in_shift=s, relu=relu, shuffle=r)
            for c, k in ([(64, 3)] if quick else [(64, 3), (64, 5), (128, 3)]):
                x = _t(n, h, w, c, dtype=dt)
                w1, w2 = _t(c, c, k, k, dtype=dt), _t(c, c, k, k, dtype=dt)
                b1, b2 = torch.randn(c), torch.randn(c)
                resblock_nhwc(x, pack_weight(w1), b1, pack_weight(w2), b2, k, 0.1)
                resblock_backward_nhwc(_t(n, h, w, c, dtype=dt), x, w1, b1, w2, k, 0.1)
    return rec.launches


def build_model(name: str, scale: int, dtype: torch.dtype) -> torch.nn.Module:
    """The preset on the fused Triton path (built inside gpu_code_path: backend='triton' is
    refused at construction on a machine with neither a GPU nor the interpreter)."""
    from fastsr.models.edsr import PRESETS

    kw = dict(fused=True, backend="triton", dtype=None if dtype == torch.float32 else dtype)
    if name.startswith("mdsr"):
        return PRESETS[name](**kw)
    return PRESETS[name](scale, **kw)


def drive_model(name: str, scale: int, lr_size: tuple[int, int], dtype: torch.dtype,
                train_batch: int = TRAIN_BATCH, train_patch: tuple[int, int] = TRAIN_PATCH,
                train: bool = True, arch: int = 90, candidates: bool = True) -> Recorder:
    """Record every launch of one fused inference forward (batch 1, lr_size) and one fused
    training step (train_batch LR patches of train_patch, L1 loss, forward + backward) of the
    preset, with what the model itself runs: fused=True, backend='triton', the GPU path; and
    the PyTorch ops around them (Recorder.torch_ops). candidates: also each residual block's
    two-conv alternative (`block_candidates`; False: only what backend="triton" pins).

    Nothing is computed (launches are recorded, outputs stay uninitialized): the tensors only
    carry shapes, dtypes and storage layouts, on the CPU."""
    rec = Recorder()
    alternatives = block_candidates(rec) if candidates else contextlib.nullcontext()
    with gpu_code_path(arch=arch), recording(rec), alternatives:
        model = build_model(name, scale, dtype)
        fwd = (lambda x: model(x, scale=scale)) if name.startswith("mdsr") else model
        image = torch.rand(1, 3, *lr_size) * 255
        patches = torch.rand(train_batch, 3, *train_patch) * 255
        # Building the model and its inputs is not part of a step, nor is the first inference
        # call's one-time work (the folded weights are built then cached; the input range is
        # checked once): one forward first, its record dropped, then the steady state watched.
        model.eval()
        with torch.no_grad():
            fwd(image)
        rec.launches.clear()
        with TorchOps(rec):
            rec.phase = "inference"
            with torch.no_grad():
                fwd(image)
            if train:
                model.train()
                rec.phase = "train.forward"
                out = fwd(patches)
                loss = torch.nn.functional.l1_loss(out.float(), torch.zeros_like(out, dtype=torch.float32))
                rec.phase = "train.backward"
                loss.backward()
    return rec


# -------------------------------------------------------------------------------- compiling


def _short_config(config: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items() if k != "num_ctas")


def _launch_values(launch: Launch, config: dict) -> dict:
    """Every parameter's value at this launch (tensors as shape/dtype), config included."""
    names = [p.name for p in launch.fn.params]
    vals = dict(zip(names, _config_args(launch, config) if config else launch.args))
    vals.update({k: v for k, v in {**launch.kwargs, **config}.items() if k not in _OPTIONS})
    for p in launch.fn.params:
        if p.name not in vals and p.default is not inspect.Parameter.empty:
            vals[p.name] = p.default
    return vals


def _grid(launch: Launch, config: dict) -> list[int] | None:
    grid = launch.grid
    if callable(grid):
        grid = grid(_launch_values(launch, config))
    return None if grid is None else [int(g) for g in grid]


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        return dict(shape=list(v.shape), dtype=str(v.dtype).replace("torch.", ""))
    if isinstance(v, TensorDescriptor):  # the tensor it boxes, and the box the launcher built
        return dict(shape=[int(d) for d in v.shape], dtype=str(v.base.dtype).replace("torch.", ""),
                    block_shape=[int(b) for b in v.block_shape], tensordesc=True)
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return str(v)


@dataclass
class Variant:
    """One compiled kernel: a JIT function with one specialization and one config."""

    key: str
    name: str
    config: dict
    spec: Specialized
    launch: Launch        # the first launch that needs it
    launches: list[int] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    kernel: Any = None
    ptxas_log: str = ""
    error: str | None = None


def variants(launches: list[Launch], arch: int, first_config: bool,
             jit_attrs: bool = True) -> tuple[list[Variant], list[dict]]:
    """Deduplicate launches x configs into the kernels to compile (the same kernel serves many
    launches: 16 blocks, say); returns them and a per-launch record for the manifest."""
    found: dict[str, Variant] = {}
    records = []
    for i, launch in enumerate(launches):
        cfgs = launch.configs[:1] if first_config else launch.configs
        rec = dict(index=i, phase=launch.phase, kernel=launch.fn.__name__, launcher=launch.launcher,
                   args={}, configs=[], candidate=launch.candidate, alternative_of=launch.alternative_of)
        for j, config in enumerate(cfgs):
            spec = specialize(launch, config, arch, jit_attrs)
            key_src = json.dumps([launch.fn.__name__, spec.signature, {str(k): str(v) for k, v in spec.constexprs.items()},
                                  {str(k): v for k, v in spec.attrs.items()}, spec.options], sort_keys=True, default=str)
            key = hashlib.sha1(key_src.encode()).hexdigest()[:12]
            role = role_of(launch, spec)
            if j == 0:
                rec["role"] = role
                rec["args"] = {k: _jsonable(v) for k, v in _launch_values(launch, {}).items()}
                rec["divisible_by_16"] = spec.divisible(launch.fn)
                rec["constant_ints"] = spec.constant_ints(launch.fn)
            v = found.setdefault(key, Variant(key, launch.fn.__name__, config, spec, launch))
            v.launches.append(i)
            if role not in v.roles:
                v.roles.append(role)
            rec["configs"].append(dict(config=config, kernel_key=key, grid=_grid(launch, config)))
        records.append(rec)
    return list(found.values()), records


def _error_line(text: str) -> str:
    """The line of a compile error that says what is wrong: Triton's CompilationError ends with
    the source line and a caret under it, so the last line alone reads "^"; take the last line
    with words in it (the message, or the failing source line when that is all there is)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    worded = [line for line in lines if any(ch.isalpha() for ch in line)]
    return (worded or lines)[-1][:300]


def compile_all(vs: list[Variant], arch: int, jobs: int = 1) -> None:
    """Compile every variant (errors are kept on the variant: a compile error is a finding)."""

    def one(v: Variant) -> None:
        try:
            v.kernel, v.ptxas_log = compile_launch(v.launch, v.config, arch, v.spec)
        except Exception as e:  # report it, go on
            v.error = f"{type(e).__name__}: {_error_line(str(e))}" if str(e).strip() else repr(e)

    with ptxas_reports():
        if jobs > 1:
            # triton.compile spends most of its time in ptxas and LLVM, outside the GIL.
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(jobs) as pool:
                list(pool.map(one, vs))
        else:
            for v in vs:
                one(v)


# ---------------------------------------------------------------------------------- reports

_COLUMNS = [  # (header, width, row -> text)
    ("role", 14, lambda r: r["role"]),
    ("kernel", 20, lambda r: r["name"].strip("_").replace("_kernel", "")),
    ("phase", 9, lambda r: "+".join(sorted({p.replace("train.", "t.") for p in r["phases"]}))),
    ("shape", 22, lambda r: _shape_text(r["constexprs"])),
    ("config", 38, lambda r: r["config_text"].replace("num_warps=", "w").replace("num_stages=", "s")),
    ("mma", 5, lambda r: r["sass"]["mma"]),
    ("regs", 4, lambda r: r["sass"]["regs"]),
    ("spill", 5, lambda r: "?" if r["sass"]["spill_store_bytes"] is None else r["sass"]["spill_store_bytes"]),
    ("stack", 5, lambda r: r["sass"]["stack_bytes"]),
    ("ldl/stl", 7, lambda r: f"{r['sass']['ldl']}/{r['sass']['stl']}"),
    ("smemKiB", 7, lambda r: f"{r['sass']['smem_bytes'] / 1024:.1f}"),
    ("cta/SM", 6, lambda r: r["sass"]["ctas"]),
    ("tma", 3, lambda r: r["sass"]["tma_loads"] + r["sass"]["tma_stores"]),
    ("cp.async", 8, lambda r: r["sass"]["cp_async"]),
    ("ld B", 4, lambda r: r["sass"]["widest_load"]),
    ("st B", 4, lambda r: f"{r['sass']['narrowest_store']}-{r['sass']['widest_store']}"),
    ("int/hgmma", 9, lambda r: "-" if r["sass"]["int_pred_per_hgmma"] is None else r["sass"]["int_pred_per_hgmma"]),
]


def _shape_text(c: dict) -> str:
    """'64->64 k3 skip' from a launch's constexprs: channels in -> out, kernel size, the
    epilogue/prologue flags that are on."""
    cin = c.get("C_IN", c.get("C"))
    # The padded copy (kernels/pad.py) writes C_PAD channels a pixel.
    cout = f"{c['C_PAD']}ch" if "C_PAD" in c else c.get("C_OUT", c.get("C_G", c.get("C")))
    text = f"{cin}->{cout} k{c.get('KS', '?')}"
    r = c.get("SHUFFLE", c.get("R", 1))
    flags = [f"r{r}"] if r and r > 1 else []
    flags += [k.replace("HAS_", "").lower() for k in ("HAS_SHIFT", "RELU", "HAS_SKIP", "IN_MASK", "OUT_MASK")
              if c.get(k)]
    return " ".join([text, *flags])


def table_text(rows: list[dict]) -> str:
    head = "  ".join(f"{h:<{w}}" for h, w, _ in _COLUMNS)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append("  ".join(f"{str(f(r)):<{w}}" for _, w, f in _COLUMNS))
    return "\n".join(lines)


_TABLE_NOTES = """\
columns: mma = tensor-core instruction kind in the SASS (HGMMA = Hopper wgmma, HMMA = mma.sync,
none = FFMA only); regs per thread; spill = ptxas's spill-store bytes; stack = stack frame
bytes (cuobjdump); ldl/stl = local-memory instructions; smemKiB = dynamic + static
shared memory per CTA; cta/SM = resident CTAs per SM of an H200 (132 SMs, 64K registers, 228 KiB
shared memory per SM); tma = UTMALDG + UTMASTG; cp.async = LDGSTS instructions; ld B = widest
global load per thread (LDG or LDGSTS), st B = narrowest-widest global store (bytes); int/hgmma =
integer + predicate instructions per HGMMA in the hot loop (the innermost loop with the most
HGMMAs; where the compiler unrolled it completely, the code from the first HGMMA to the last). phase: inference (batch 1 at the LR size), t.forward / t.backward (one training step)."""


def check_wide_loads(rows: list[dict]) -> list[str]:
    """Problems: a bf16/fp16 body conv whose hot loop (where its operands are loaded) has no
    16-byte global load. That is what a compile without the JIT's pointer alignment looks like
    (narrow scalar loads, no cp.async). The TMA conv (kernels/conv2d_tma.py) loads its operands
    as tensor boxes: its hot loop must issue UTMALDG instead, and no LDG narrower than 16 B.
    So does the TMA residual block (kernels/resblock_tma.py): UTMALDG in its hot loop, no cp.async,
    and its other global loads and stores (skip, workspace, out) 16 bytes wide."""
    bad = []
    for r in rows:
        if r["name"] == "_resblock_tma_kernel":
            sass = r["sass"]
            if not sass.get("hot_loop_tma_loads"):
                bad.append(f"TMA block {r['config_text']}: no UTMALDG in the hot loop")
            if sass["cp_async"]:
                bad.append(f"TMA block {r['config_text']}: {sass['cp_async']} cp.async (LDGSTS), expected none")
            if sass["narrowest_store"] < 16 or sass["hot_loop_widest_load"] not in (0, 16):
                bad.append(f"TMA block {r['config_text']}: stores {sass['stores_by_width']} B, hot-loop load "
                           f"{sass['hot_loop_widest_load']} B: expected 16-byte accesses")
        if r["role"] != "body" or r["dtype"] not in ("bf16", "fp16"):
            continue
        sass = r["sass"]
        if r["name"] == "_conv2d_nhwc_kernel":
            got = sass["hot_loop_widest_load"] or 0
            if got < 16:
                bad.append(f"body conv {r['config_text']}: widest global load in the hot loop {got} B, not 16")
        elif r["name"] == "_conv2d_tma_kernel":
            if not sass.get("hot_loop_tma_loads"):
                bad.append(f"TMA body conv {r['config_text']}: no UTMALDG in the hot loop")
            if sass["cp_async"]:
                bad.append(f"TMA body conv {r['config_text']}: {sass['cp_async']} cp.async (LDGSTS), expected none")
    return bad


# The roles whose kernels are convolutions (tensor-core work); "reduce" (wgrad's slot sum),
# "pad" (the bordered operand copies) and "other" are not.
MMA_ROLES = ("head", "body", "block", "upsampler", "tail", "dgrad", "wgrad")


def check_hopper(rows: list[dict]) -> list[str]:
    """Problems against issue 13's done-when, over every compiled config (sm_90 emissions):
    every conv kernel (MMA_ROLES) issues HGMMA; no kernel spills; a conv kernel's operand loads
    (its hot loop's global loads; a fully unrolled kernel's, up to its last MMA) are 16 bytes
    wide or TMA boxes; body convs and the residual block load through TMA (UTMALDG in the hot
    loop); the upsampler's global stores are at least 8 bytes wide (or TMA stores)."""
    bad = []
    for r in rows:
        sass, what = r["sass"], f"{r['role']} {r['name'].strip('_')} {_shape_text(r['constexprs'])} {r['config_text']}"
        if sass["spill_store_bytes"] is None or sass["spill_store_bytes"] > 0 or sass["ldl"] or sass["stl"]:
            bad.append(f"{what}: spills ({sass['spill_store_bytes']} B, {sass['ldl']} LDL / {sass['stl']} STL)")
        role = r["role"].split("+")[0]
        if role not in MMA_ROLES:
            continue
        if sass["mma"] != "HGMMA":
            bad.append(f"{what}: mma {sass['mma']}, not HGMMA")
            continue
        if sass.get("wgmma_serialized"):
            bad.append(f"{what}: ptxas serialized its wgmmas (C7514: an accumulator read between wgmma and wait)")
        narrow = sass.get("hot_loop_narrowest_load")
        if narrow is not None and 0 < narrow < 16:
            bad.append(f"{what}: operand loads {sass['hot_loop_loads_by_width']} (bytes: count), not all 16 B or TMA")
        if role in ("body", "block") and not sass.get("hot_loop_tma_loads"):
            bad.append(f"{what}: no TMA load (UTMALDG) in the hot loop")
        if role == "upsampler" and sass["stg"] and sass["narrowest_store"] < 8:
            bad.append(f"{what}: {sass['narrowest_store']}-byte global stores (want >= 8 B or TMA)")
    return bad


def _kernel_dtype(signature: dict) -> str:
    """The element type of the kernel's first tensor argument: a pointer ("*bf16") or a TMA
    descriptor ("tensordesc<bf16[1, 1, 128, 64]>")."""
    for t in signature.values():
        if isinstance(t, str) and t.startswith("*"):
            return t[1:]
        if isinstance(t, str) and t.startswith("tensordesc<"):
            return t[len("tensordesc<"):].split("[")[0]
    return ""


def emit(launches: list[Launch], arch: int, out_dir: Path | None, first_config: bool, jobs: int,
         meta: dict, torch_ops: list[dict] = ()) -> tuple[list[dict], list[str]]:
    """Compile, read the SASS, and (out_dir) write cubins, manifest.json, sass_report.{json,txt}.
    Returns the table rows and the problems found."""
    vs, records = variants(launches, arch, first_config, meta.get("jit_attrs", True))
    t0 = time.perf_counter()
    compile_all(vs, arch, jobs)
    compile_s = time.perf_counter() - t0
    limit = SMEM_LIMIT.get(arch, 99 * 1024)
    rows, problems, entries = [], [], []
    scratch = Path(out_dir or Path(os.environ.get("TMPDIR", "/tmp")) / f"fastsr_compile_check_{os.getpid()}")
    for v in vs:
        phases = sorted({launches[i].phase for i in v.launches})
        dtype = _kernel_dtype(v.spec.signature)
        shown = {k: v2 for k, v2 in {**v.launch.kwargs, **v.config}.items()
                 if k.isupper() and not k.startswith(("INTERP", "PREC", "USE_INPUT"))}
        # The main-loop forms a config switches on (kernels/conv2d_tma.py) are named in it too:
        # two configs of one block size and warps may differ only there.
        forms = [k.lower() for k in _FORM_FLAGS if shown.get(k) is True]
        config_text = " ".join([f"{k}={x}" for k, x in shown.items() if k.startswith(("BLOCK", "TILE"))] + forms) + \
            " " + _short_config({k: x for k, x in v.config.items() if k in _OPTIONS})
        if v.error:
            problems.append(f"FAIL {v.name} {config_text}: {v.error}")
            continue
        cubin_rel = f"cubins/{v.name.strip('_')}_{v.key}.cubin"
        report, sass = cubin_report(v.kernel.asm["cubin"], scratch / cubin_rel, v.ptxas_log,
                                    v.kernel.metadata.shared, v.config.get("num_warps", 4))
        if out_dir is not None:
            (out_dir / cubin_rel).with_suffix(".sass").write_text(sass)
        if report["smem_bytes"] > limit:
            problems.append(f"SMEM {v.name} {config_text}: {report['smem_bytes']} B > {limit} B per block")
        for role in v.roles:
            row = dict(name=v.name, role=role, dtype=dtype, config=v.config, config_text=config_text.strip(),
                       constexprs={k: x for k, x in shown.items()}, phases=phases, kernel_key=v.key,
                       launches=[i for i in v.launches if records[i]["role"] == role],
                       cubin=cubin_rel, divisible_by_16=v.spec.divisible(v.launch.fn),
                       constant_ints=v.spec.constant_ints(v.launch.fn), sass=report)
            rows.append(row)
            entries.append({k: row[k] for k in ("name", "role", "config", "cubin", "dtype", "constexprs", "phases",
                                                "kernel_key", "launches", "divisible_by_16", "constant_ints")})
    order = {r: i for i, r in enumerate(ROLES)}
    rows.sort(key=lambda r: (order.get(r["role"].split("+")[0], 99), r["name"], r["dtype"], r["config_text"]))
    problems += [f"NARROW {p}" for p in check_wide_loads(rows)] if meta.get("check_wide_loads") else []
    problems += [f"HOPPER {p}" for p in check_hopper(rows)] if meta.get("check_hopper") else []
    meta = {**meta, "compile_s": round(compile_s, 1), "kernels_compiled": len(vs)}
    if out_dir is not None:
        manifest = {"arch": arch, **meta, "kernels": entries, "launches": records, "torch_ops": list(torch_ops)}
        (out_dir / "manifest.json").write_text(_json_lines(manifest))
        (out_dir / "sass_report.json").write_text(_json_lines(
            {"arch": arch, **meta, "rows": [{k: r[k] for k in r if k != "config_text"} for r in rows]}))
        (out_dir / "sass_report.txt").write_text(_report_text(rows, meta, arch, problems))
    elif scratch.exists():
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    return rows, problems


def _json_lines(obj: dict) -> str:
    """JSON with one top-level key per line and each element of a top-level list on its own
    line, compact inside: small files that still diff line by line."""
    parts = []
    for k, v in obj.items():
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            items = ",\n  ".join(json.dumps(x, separators=(",", ":"), default=str) for x in v)
            parts.append(f"{json.dumps(k)}: [\n  {items}\n ]")
        else:
            parts.append(f"{json.dumps(k)}: {json.dumps(v, default=str)}")
    return "{\n " + ",\n ".join(parts) + "\n}\n"


def _report_text(rows: list[dict], meta: dict, arch: int, problems: list[str]) -> str:
    head = (f"# SASS report, sm_{arch}: {meta.get('model', 'kernel sweep')}"
            + (f" x{meta['scale']} at {meta['lr_size']} {meta['dtype']}" if meta.get("model") else "")
            + f"\n# triton {triton.__version__}, torch {torch.__version__}; {meta.get('kernels_compiled')} kernels "
              + ("compiled with the JIT's specialization (pointers 256-byte aligned)\n" if meta.get("jit_attrs", True)
                 else "compiled WITHOUT the JIT's specialization (--no-specialize: no GPU launch runs these)\n"))
    return head + _TABLE_NOTES + "\n\n" + table_text(rows) + "\n\n" + (
        "\n".join(problems) if problems else "no problems") + "\n"


_COMPARED = ("mma", "hgmma_shape", "regs", "spill_store_bytes", "stack_bytes", "smem_bytes", "ctas", "tma_loads",
             "cp_async", "widest_load", "widest_store", "narrowest_store", "int_pred_per_hgmma")


def compare_reports(a: dict, b: dict) -> str:
    """Two sass_report.json (two Triton versions, say) side by side: per kernel (role, phase,
    shape, config) the facts that differ, and which facts never differ."""

    def index(rep):
        out = {}
        for r in rep["rows"]:
            cfg = {k: v for k, v in r["config"].items() if k != "num_ctas"}
            key = (r["role"], r["name"], r["dtype"], _shape_text(r["constexprs"]), json.dumps(cfg, sort_keys=True),
                   "+".join(r["phases"]))
            out[key] = r["sass"]
        return out

    ia, ib = index(a), index(b)
    common = [k for k in ia if k in ib]
    lines = [f"A: triton {a.get('triton')}  B: triton {b.get('triton')}  ({len(common)} kernels in both, "
             f"{len(ia) - len(common)} only in A, {len(ib) - len(common)} only in B)"]
    same = set(_COMPARED)
    for k in common:
        diffs = [f"{f} {ia[k].get(f)} -> {ib[k].get(f)}" for f in _COMPARED if ia[k].get(f) != ib[k].get(f)]
        same -= {d.split()[0] for d in diffs}
        if diffs:
            role, name, dtype, shape, cfg, phases = k
            cfg_text = " ".join(f"{x}={y}" for x, y in json.loads(cfg).items())
            lines.append(f"{role:<10} {shape:<18} {cfg_text:<50} {phases:<28} " + "; ".join(diffs))
    lines.append("identical in every kernel: " + ", ".join(f for f in _COMPARED if f in same))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- main


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 540x960, got {text!r}") from None
    return h, w


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    p.add_argument("--first-config", action="store_true", help="only the first autotune config of each launch")
    p.add_argument("--quick", action="store_true", help="kernel sweep: one shape per kernel, fp16 only")
    p.add_argument("--model", choices=["edsr_baseline", "edsr", "mdsr_baseline", "mdsr"],
                   help="drive this preset's fused forward and training step instead of the kernel sweep")
    p.add_argument("--scale", type=int, default=2, help="upscaling factor (--model)")
    p.add_argument("--lr-size", type=_size, default=(540, 960), help="inference LR size HxW (--model)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16", help="compute dtype (--model)")
    p.add_argument("--train-batch", type=int, default=TRAIN_BATCH, help="training step batch (--model)")
    p.add_argument("--train-patch", type=_size, default=TRAIN_PATCH, help="training LR patch HxW (--model)")
    p.add_argument("--no-train", action="store_true", help="inference launches only (--model)")
    p.add_argument("--no-block-candidates", action="store_true",
                   help="record only the one-launch block, not also its two-conv alternative (--model)")
    p.add_argument("--emit", type=Path, metavar="DIR", help="write cubins, manifest.json, sass_report.{json,txt}")
    p.add_argument("--check-wide-loads", action="store_true",
                   help="fail if a bf16/fp16 body conv has no 16-byte global load")
    p.add_argument("--check-hopper", action="store_true",
                   help="fail on issue 13's done-when: a conv kernel without HGMMA, any spill, conv operand loads "
                        "narrower than 16 B and not TMA, a body conv or block without TMA loads, upsampler "
                        "stores under 8 B (sm_90)")
    p.add_argument("--no-specialize", action="store_true",
                   help="compile without the attributes the JIT derives from real arguments (the old, wrong way)")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compile threads")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"),
                   help="compare two sass_report.json (e.g. two Triton versions) and exit")
    args = p.parse_args(argv)
    if args.compare:
        print(compare_reports(*(json.loads(f.read_text()) for f in args.compare)))
        return 0
    t0 = time.perf_counter()
    if args.model:
        rec = drive_model(args.model, args.scale, args.lr_size, _DTYPES[args.dtype],
                          args.train_batch, args.train_patch, train=not args.no_train, arch=args.arch,
                          candidates=not args.no_block_candidates)
        launches, torch_ops = rec.launches, rec.torch_ops
        meta = dict(model=args.model, scale=args.scale, lr_size=list(args.lr_size), dtype=args.dtype,
                    train_batch=args.train_batch, train_patch=list(args.train_patch), train=not args.no_train,
                    block_candidates=not args.no_block_candidates)
    else:
        launches, torch_ops = drive(args.quick, args.arch), []
        meta = dict(model=None, quick=args.quick)
    meta.update(triton=triton.__version__, torch=torch.__version__, first_config=args.first_config,
                pinned_configs=os.environ.get("FASTSR_DETERMINISTIC") == "1",
                check_wide_loads=args.check_wide_loads, check_hopper=args.check_hopper,
                jit_attrs=not args.no_specialize,
                launches_recorded=len(launches))
    if args.emit:
        args.emit.mkdir(parents=True, exist_ok=True)
    rows, problems = emit(launches, args.arch, args.emit, args.first_config, args.jobs, meta, torch_ops)
    print(_TABLE_NOTES + "\n\n" + table_text(rows))
    for line in problems:
        print(line)
    print(f"\n{len(launches)} launches recorded, {len({r['kernel_key'] for r in rows})} kernel configs compiled for "
          f"sm_{args.arch} in {time.perf_counter() - t0:.0f} s: {len(problems)} problem(s) "
          f"(shared memory limit {SMEM_LIMIT.get(args.arch, 99 * 1024) // 1024} KiB per block)"
          + (f"; wrote {args.emit}/manifest.json" if args.emit else ""))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
