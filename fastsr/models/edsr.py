"""EDSR and MDSR (Lim et al., CVPR-W 2017), eager PyTorch, exactly the official layout.

Module names and parameter shapes match the official EDSR-PyTorch release, so its
checkpoints load with `strict=True`:

    sub_mean, add_mean              frozen 1x1 convs (mean shift, scaled by rgb_range)
    head.0                          conv 3 -> F
    body.{i}.body.{0,2}             residual block i: conv, ReLU, conv   (i < B)
    body.{B}                        conv F -> F after the blocks (plus the global skip)
    tail.0.{0,2}                    upsampler convs (EDSR; x4 has two x2 stages)
    tail.1 (EDSR) / tail.0 (MDSR)   conv F -> 3
    pre_process.{s}.{0,1}.body.{0,2}  MDSR: two 5x5 residual blocks per scale index s
    upsample.{s}.{0,2}              MDSR: upsampler per scale index s

Inputs are (N, 3, H, W) float in 0..input_range (rgb_range, the weights' range, unless
given); outputs (N, 3, s*H, s*W), same range (not clamped). `fused=True` runs the same math through fastsr's fused ops
(fastsr.models.fused); `backend` forces one of them by name ("triton", "cpu",
"reference"); `dtype` sets the fused path's compute dtype (e.g. torch.bfloat16 on a
CPU with bf16 instructions). After each forward, `model.backend` names what ran.
"""
from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Sequence

import torch
import torch.nn as nn

from fastsr.errors import BackendUnavailable

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)
# The official Upsampler's scales: 3, or a power of two (one conv + PixelShuffle(2) per
# factor 2; x8 checkpoints exist).
SUPPORTED_SCALES = (2, 3, 4, 8)


def default_conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv2d:
    """The official `default_conv`: bias on, "same" padding, stride 1."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=True)


class MeanShift(nn.Conv2d):
    """Frozen 1x1 conv adding `sign * rgb_range * mean` per channel (official MeanShift)."""

    def __init__(self, rgb_range: float, rgb_mean: Sequence[float] = DIV2K_RGB_MEAN, sign: int = -1):
        super().__init__(3, 3, kernel_size=1)
        self.weight.data = torch.eye(3).view(3, 3, 1, 1)
        self.bias.data = sign * rgb_range * torch.tensor(rgb_mean, dtype=torch.float32)
        for p in self.parameters():
            p.requires_grad = False


class ResBlock(nn.Module):
    """`x + res_scale * conv(relu(conv(x)))`; `body.0` and `body.2` hold the convs."""

    def __init__(self, n_feats: int, kernel_size: int = 3, res_scale: float = 1.0):
        super().__init__()
        self.body = nn.Sequential(
            default_conv(n_feats, n_feats, kernel_size),
            nn.ReLU(inplace=True),
            default_conv(n_feats, n_feats, kernel_size),
        )
        self.res_scale = float(res_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.body(x).mul(self.res_scale)
        res += x
        return res


def check_scale(scale: int, allowed: Sequence[int] = SUPPORTED_SCALES) -> int:
    """Return `scale` as an int or raise ValueError naming the allowed values."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or int(scale) != scale:
        raise ValueError(f"scale must be one of {tuple(allowed)}, got {scale!r}")
    if int(scale) not in allowed:
        raise ValueError(f"scale must be one of {tuple(allowed)}, got {scale!r}")
    return int(scale)


class Upsampler(nn.Sequential):
    """Official upsampler: x2/x4/x8 = one/two/three [conv F->4F, PixelShuffle(2)]; x3 = [conv F->9F, PixelShuffle(3)]."""

    def __init__(self, scale: int, n_feats: int):
        scale = check_scale(scale)
        layers: list[nn.Module] = []
        if scale == 3:
            layers += [default_conv(n_feats, 9 * n_feats, 3), nn.PixelShuffle(3)]
        else:
            for _ in range(int(math.log2(scale))):
                layers += [default_conv(n_feats, 4 * n_feats, 3), nn.PixelShuffle(2)]
        super().__init__(*layers)
        self.scale = scale


class _FusedMixin:
    """Shared `fused`/`backend` handling; the fused forward lives in fastsr.models.fused."""

    def _init_fused(self, fused: bool, backend: str | None, dtype: torch.dtype | None,
                    recompute: bool | None = None) -> None:
        from fastsr.ops.dispatch import check_backend_name

        if recompute is not None and not isinstance(recompute, bool):
            raise TypeError(f"recompute must be True, False or None (auto), got {recompute!r}")
        # Training memory vs speed: True recomputes each block's conv1 + ReLU and the upsampler
        # and tail in backward (about half the activation memory); False saves them as eager
        # autograd does (no recomputed work); None: False on the cpu backend (memory is
        # plentiful there, compute is not), True on the others (the GPU path).
        self.recompute = recompute

        if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype (the fused path's compute dtype) must be float32/float16/bfloat16, got {dtype}")
        if dtype is not None and not (fused or backend is not None):
            raise ValueError("dtype selects the fused path's compute dtype: pass fused=True with it")
        self.compute_dtype = dtype
        self.fused = bool(fused) or backend is not None
        self.backend_request = check_backend_name(backend) if backend is not None else None
        if backend is not None:
            from fastsr.ops.dispatch import machine_reasons

            reasons = machine_reasons(backend)
            if reasons:
                raise BackendUnavailable(f"backend={backend!r} cannot run on this machine: " + "; ".join(reasons))
        self._backend: str | None = None  # what the last forward ran; see the `backend` property
        self._range_checked = False       # the one-time 0..1-input check (see _check_range)
        self._graphs_warned = False       # the one-time "cuda_graphs cannot apply" warning
        self.graphs = None  # a fastsr.cuda_graphs.GraphedForward once prepare_for_inference(cuda_graphs=True)
        # The fused path's last forward, one mapping per conv / block layer: "layer" (module
        # name), "implementation", "backend" (its family), "times_ms" where timing chose it.
        self.plan: list[dict] = []

    def _init_weights(self, weights: str | os.PathLike | None) -> None:
        """weights=None keeps the random initialization; "default", "official", "hf://..." or
        a path loads strictly (see fastsr.weights.resolve_weights)."""
        if weights is None:
            return
        if not isinstance(weights, (str, os.PathLike)):
            raise TypeError(f"weights must be None, 'default', 'official', 'hf://owner/repo[/file]' or a path, "
                            f"got {type(weights).__name__}")
        from fastsr.checkpoints import load_weights
        from fastsr.weights import resolve_weights

        load_weights(self, resolve_weights(weights, self.arch))

    def prepare_for_inference(self, io_dtype: torch.dtype = torch.float32, cuda_graphs: bool = False,
                              max_graphs: int = 8) -> "nn.Module":
        """Fold, cast and lay out the weights once (mean shifts folded, compute dtype) for inference.

        The plan is cached under the parameters' version counters, so changing a parameter
        afterwards rebuilds it instead of using stale weights. cuda_graphs=True replays a
        CUDA graph for repeated same-shape calls on CUDA tensors without gradients (see
        fastsr.cuda_graphs; `self.graphs` counts captures and replays). Returns self in eval mode.
        """
        from fastsr.cuda_graphs import GraphedForward
        from fastsr.models.fused import get_plan

        if cuda_graphs and not self.fused:
            raise ValueError("cuda_graphs=True replays the fused forward: build the model with fused=True")
        if self.fused:
            with torch.no_grad():
                get_plan(self, self.compute_dtype or io_dtype, io_dtype)
        self.graphs = GraphedForward(self, max_graphs=max_graphs) if cuda_graphs else None
        if cuda_graphs and not torch.cuda.is_available():
            self._warn_no_graphs("no CUDA device is available")
        return self.eval()

    def _warn_no_graphs(self, why: str) -> None:
        """Once per model: cuda_graphs=True was asked for and cannot apply."""
        if not self._graphs_warned:
            self._graphs_warned = True
            warnings.warn(f"cuda_graphs=True has no effect here: {why}; the forward runs without CUDA graphs "
                          "(warned once per model)", stacklevel=3)

    @property
    def backend(self) -> str:
        """What runs the network: the backend family the last forward ran ("eager" for the
        reference modules, else "triton", "aten", "cpu", "reference", or "mixed" when the
        measured choice ran layers on different families: `self.plan` lists each layer's
        implementation); before any call, the family a float32 input on the model's device
        would get (the forced `backend=` if one was given)."""
        if self._backend is not None:
            return self._backend
        if not self.fused:
            return "eager"
        if self.backend_request is not None:
            return self.backend_request
        from fastsr.ops.dispatch import choose_backend

        device = next(self.parameters()).device
        return choose_backend(torch.empty(1, 3, 1, 1, device=device))

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = value

    def _check_range(self, x: torch.Tensor) -> None:
        """Once per model: warn when a model taking 0..255 (input_range 255) gets what looks
        like 0..1 input (the torchvision / BasicSR habit), which silently gives values far off range."""
        self._range_checked = True
        if self.input_range <= 1 or x.numel() == 0 or torch.compiler.is_compiling():
            return
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return  # no host sync inside a CUDA graph capture
        with torch.no_grad():  # not x.detach(): no view of the caller's input is made
            low = float(x.amax()) <= 1.0
        if low:
            warnings.warn(f"this model takes 0..{self.input_range:g} input and got values in 0..1: multiply by "
                          f"{self.input_range:g}, or build it with input_range=1 (checked once per model)",
                          stacklevel=3)

    def _init_input_range(self, input_range: float | None) -> None:
        """input_range: the range forward takes and returns (default rgb_range, the range the
        weights were trained on); another is scaled to rgb_range going in and back coming out,
        e.g. input_range=1 runs official 0..255 weights on 0..1 tensors."""
        value = self.rgb_range if input_range is None else input_range
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"input_range must be a positive number (1 for 0..1 input, 255 for 0..255), got {input_range!r}")
        self.input_range = float(value)

    def _forward_dispatch(self, x: torch.Tensor, scale_idx: int) -> torch.Tensor:
        _check_input(x)
        if not self._range_checked:
            self._check_range(x)
        gain = self.rgb_range / self.input_range
        if gain != 1.0:
            x = x * gain
        out = self._forward_network(x, scale_idx)
        return out * (1.0 / gain) if gain != 1.0 else out

    def _whole_model_choice_applies(self, x: torch.Tensor) -> bool:
        """CPU inference (eval mode, no gradients), auto or backend="openvino": the whole
        network is one choice between fastsr's fused ops and OpenVINO (fastsr.ops.dispatch)."""
        return (x.device.type == "cpu" and not self.training and not torch.is_grad_enabled()
                and self.backend_request in (None, "openvino") and not torch.compiler.is_compiling())

    def _whole_model_signature(self, shape: tuple[int, ...], compute: torch.dtype, scale_idx: int):
        """The whole-model choice's dispatch.Signature for CPU inputs of `shape` (N, 3, H, W).

        Timed on at most a _PROBE x _PROBE crop: a big input (a 1568-px tile takes ~10 s a
        forward on 2 cores) is one choice for all its sizes, at a few seconds of timing
        instead of minutes; smaller inputs are timed at their own size."""
        from fastsr.ops import dispatch

        n, c, h, w = shape
        probe = (n, c, min(h, _PROBE), min(w, _PROBE))
        return dispatch.Signature("model", "cpu", dispatch.device_name(torch.device("cpu")), compute, probe,
                                  self.n_feats, 3, (self.arch, scale_idx))

    def whole_model_probe(self, shape: tuple[int, ...], scale: int) -> tuple[int, ...] | None:
        """The crop (N, 3, h, w) at which CPU inference of an input of `shape` would still time
        fastsr's fused ops against OpenVINO (both run there, and what each leaves on the heap
        stays), or None when no timing is left to do: an eager or forced backend, one eligible
        candidate, deterministic mode, a choice already made or on disk. For memory planning."""
        from fastsr.ops import dispatch

        if not self.fused or self.backend_request not in (None, "openvino"):
            return None
        scale_idx = self.scale_index(scale) if hasattr(self, "scale_index") else 0
        sig = self._whole_model_signature(tuple(shape), self.compute_dtype or torch.float32, scale_idx)
        return sig.shape if dispatch.would_time("model", sig, self.backend_request) else None

    def _forward_whole(self, x: torch.Tensor, scale_idx: int) -> torch.Tensor | None:
        """OpenVINO's output when the measured choice (or backend="openvino") says so, else None."""
        from fastsr.models.fused import fused_forward
        from fastsr.ops import dispatch
        from fastsr.ops.backends.openvino import PRECISIONS, openvino_forward

        compute = self.compute_dtype or x.dtype
        sig = self._whole_model_signature(tuple(x.shape), compute, scale_idx)
        probe = sig.shape

        def make_run(name: str):  # fresh data of the probe's shape
            fresh = torch.rand(probe, dtype=x.dtype) * self.rgb_range
            if name == "openvino":
                return lambda: openvino_forward(self)(fresh, scale_idx, PRECISIONS[compute])
            return lambda: fused_forward(self, fresh, scale_idx)

        choice = dispatch.choose("model", sig, self.backend_request, make_run)
        if choice.name != "openvino":
            return None
        out = openvino_forward(self)(x, scale_idx, PRECISIONS[compute])
        self.backend = "openvino"
        entry = {"layer": "", "implementation": "openvino", "backend": "openvino"}
        if choice.times_ms is not None:
            entry["times_ms"] = dict(choice.times_ms)
        self.plan = [entry]
        return out

    def _forward_network(self, x: torch.Tensor, scale_idx: int) -> torch.Tensor:
        """x in 0..rgb_range -> output in 0..rgb_range, fused or eager; sets self.backend."""
        if not self.fused or _onnx_exporting():
            # ONNX export records the eager modules' graph of the same weights: standard ops
            # every runtime has, where the fused ops are fastsr's own (see fastsr.export).
            self.backend = "eager"
            return self._forward_eager(x, scale_idx)
        from fastsr.models.fused import fused_forward

        if self._whole_model_choice_applies(x):
            out = self._forward_whole(x, scale_idx)
            if out is not None:
                return out
        graphs = getattr(self, "graphs", None)
        if graphs is not None and graphs.applies(x):
            out, backend = graphs(x, scale_idx)
        else:
            if graphs is not None and not x.is_cuda:
                self._warn_no_graphs(f"the input is a {x.device.type} tensor (graphs replay CUDA work)")
            out, backend = fused_forward(self, x, scale_idx)
        self.backend = backend
        return out


_PROBE = 256  # the largest side the whole-model choice (fused vs OpenVINO) is timed at


def _onnx_exporting() -> bool:
    """Inside torch.onnx.export (TorchScript or dynamo exporter). torch.onnx is not imported
    by `import torch`; when nothing imported it, no export can be running."""
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"input must be (N, 3, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor in 0..rgb_range, got {x.dtype}")
    if x.shape[2] == 0 or x.shape[3] == 0:  # an empty batch is fine: it gives an empty output
        raise ValueError(f"input must have at least one row and column, got shape {tuple(x.shape)}")


class EDSR(_FusedMixin, nn.Module):
    """Single-scale EDSR. x: (N, 3, H, W) float in 0..input_range -> (N, 3, sH, sW), same range."""

    def __init__(
        self,
        scale: int = 2,
        n_resblocks: int = 16,
        n_feats: int = 64,
        res_scale: float = 1.0,
        rgb_range: float = 255.0,
        input_range: float | None = None,
        fused: bool = False,
        backend: str | None = None,
        dtype: torch.dtype | None = None,
        recompute: bool | None = None,
        weights: str | os.PathLike | None = None,
    ):
        super().__init__()
        self.scale = check_scale(scale)
        self.n_resblocks, self.n_feats = int(n_resblocks), int(n_feats)
        self.res_scale, self.rgb_range = float(res_scale), float(rgb_range)
        self.sub_mean = MeanShift(rgb_range, sign=-1)
        self.head = nn.Sequential(default_conv(3, n_feats, 3))
        self.body = nn.Sequential(
            *[ResBlock(n_feats, 3, res_scale) for _ in range(n_resblocks)],
            default_conv(n_feats, n_feats, 3),
        )
        self.tail = nn.Sequential(Upsampler(self.scale, n_feats), default_conv(n_feats, 3, 3))
        self.add_mean = MeanShift(rgb_range, sign=1)
        self._init_input_range(input_range)
        self._init_fused(fused, backend, dtype, recompute)
        self._init_weights(weights)

    @property
    def arch(self) -> str:
        """Short architecture tag as the official code names it, e.g. 'r16f64x2'."""
        return f"r{self.n_resblocks}f{self.n_feats}x{self.scale}"

    def forward(self, x: torch.Tensor, scale: int | None = None) -> torch.Tensor:
        """Super-resolve x: (N, 3, H, W) float32 (or the model's dtype) RGB in 0..input_range
        (0..255 by default) -> (N, 3, scale*H, scale*W), same dtype and device, not clamped.

        scale: optional, must equal the model's (checked; MDSR uses it to pick its branch).
        With fused=True the fused ops run (`self.backend` says which backend did); the
        eager reference modules otherwise. Gradients flow either way.
        """
        if scale is not None and check_scale(scale) != self.scale:
            raise ValueError(f"this EDSR is built for scale {self.scale}, got scale={scale}")
        return self._forward_dispatch(x, 0)

    def _forward_eager(self, x: torch.Tensor, scale_idx: int) -> torch.Tensor:
        x = self.sub_mean(x)
        x = self.head(x)
        res = self.body(x)
        res += x
        x = self.tail(res)
        return self.add_mean(x)

    # Used by the fused path: the pieces of the network in execution order.
    def upsampler(self, scale_idx: int) -> Upsampler:
        return self.tail[0]

    def tail_conv(self) -> nn.Conv2d:
        return self.tail[1]

    def pre_blocks(self, scale_idx: int) -> Sequence[ResBlock]:
        return ()


class MDSR(_FusedMixin, nn.Module):
    """Multi-scale MDSR: shared head/body/tail, per-scale 5x5 pre-processing and upsamplers.

    x: (N, 3, H, W) float in 0..input_range; `forward(x, scale=s)` runs only scale s's branches.
    """

    def __init__(
        self,
        scales: Sequence[int] = (2, 3, 4),
        n_resblocks: int = 16,
        n_feats: int = 64,
        rgb_range: float = 255.0,
        input_range: float | None = None,
        fused: bool = False,
        backend: str | None = None,
        dtype: torch.dtype | None = None,
        recompute: bool | None = None,
        weights: str | os.PathLike | None = None,
    ):
        super().__init__()
        self.scales = tuple(check_scale(s) for s in scales)
        if len(set(self.scales)) != len(self.scales) or not self.scales:
            raise ValueError(f"scales must be distinct values from {SUPPORTED_SCALES}, got {tuple(scales)}")
        self.n_resblocks, self.n_feats = int(n_resblocks), int(n_feats)
        self.res_scale, self.rgb_range = 1.0, float(rgb_range)
        self.sub_mean = MeanShift(rgb_range, sign=-1)
        self.head = nn.Sequential(default_conv(3, n_feats, 3))
        self.pre_process = nn.ModuleList(
            [nn.Sequential(ResBlock(n_feats, 5), ResBlock(n_feats, 5)) for _ in self.scales]
        )
        self.body = nn.Sequential(
            *[ResBlock(n_feats, 3) for _ in range(n_resblocks)],
            default_conv(n_feats, n_feats, 3),
        )
        self.upsample = nn.ModuleList([Upsampler(s, n_feats) for s in self.scales])
        self.tail = nn.Sequential(default_conv(n_feats, 3, 3))
        self.add_mean = MeanShift(rgb_range, sign=1)
        self._init_input_range(input_range)
        self._init_fused(fused, backend, dtype, recompute)
        self._init_weights(weights)

    @property
    def arch(self) -> str:
        """Architecture tag, e.g. 'mdsr-r16f64' (the official code's 'r16f64' for MDSR)."""
        return f"mdsr-r{self.n_resblocks}f{self.n_feats}"

    def scale_index(self, scale: int) -> int:
        scale = check_scale(scale, self.scales)
        return self.scales.index(scale)

    def forward(self, x: torch.Tensor, scale: int | None = None) -> torch.Tensor:
        """Super-resolve x: (N, 3, H, W) float RGB in 0..input_range (0..255 by default) at one
        of `self.scales` -> (N, 3, scale*H, scale*W), same dtype and device, not clamped.

        scale: required; only that scale's pre-processing blocks and upsampler run. With
        fused=True the fused ops run (`self.backend` says which backend did).
        """
        if scale is None:
            raise ValueError(f"MDSR needs forward(x, scale=...) with scale in {self.scales}")
        return self._forward_dispatch(x, self.scale_index(scale))

    def _forward_eager(self, x: torch.Tensor, scale_idx: int) -> torch.Tensor:
        x = self.sub_mean(x)
        x = self.head(x)
        x = self.pre_process[scale_idx](x)
        res = self.body(x)
        res += x
        x = self.upsample[scale_idx](res)
        x = self.tail(x)
        return self.add_mean(x)

    def upsampler(self, scale_idx: int) -> Upsampler:
        return self.upsample[scale_idx]

    def tail_conv(self) -> nn.Conv2d:
        return self.tail[0]

    def pre_blocks(self, scale_idx: int) -> Sequence[ResBlock]:
        return tuple(self.pre_process[scale_idx])


# Presets with the published sizes (DESIGN.md table).
_FACTORY_KWARGS = """

    Keyword arguments (all factories): fused=True runs the fused Triton/CPU ops (default
    False: the eager reference modules); backend="triton" | "cpu" | "reference" forces one
    (implies fused); dtype=torch.bfloat16 / float16 is the fused path's compute dtype (the
    image stays float32 in and out); recompute=True/False trades activation memory for
    backward work (None: off on CPU, on for GPUs); rgb_range=255 is the range the weights
    were trained on; input_range (default rgb_range) the range forward takes and returns,
    e.g. input_range=1 runs 0..255 weights on 0..1 tensors.
    weights=None (random init), "default" (the shipped EDSR-baseline x2/x3/x4 files),
    "official" (the EDSR-PyTorch release, downloaded once into torch.hub's cache and
    hash-checked), "hf://owner/repo[/file]" (needs fastsr[hub]) or a checkpoint path;
    loaded strictly. For a file of unknown architecture: `model_from_checkpoint(FILE)`.
"""


def edsr_baseline(scale: int = 2, **kw) -> EDSR:
    """EDSR-baseline: 16 blocks, 64 features, res_scale 1 (1.37M params at x2)."""
    return EDSR(scale, n_resblocks=16, n_feats=64, res_scale=1.0, **kw)


def edsr(scale: int = 2, **kw) -> EDSR:
    """EDSR: 32 blocks, 256 features, res_scale 0.1 (40.7M params at x2)."""
    return EDSR(scale, n_resblocks=32, n_feats=256, res_scale=0.1, **kw)


def mdsr_baseline(**kw) -> MDSR:
    """MDSR-baseline: 16 blocks, 64 features (3.23M params)."""
    return MDSR((2, 3, 4), n_resblocks=16, n_feats=64, **kw)


def mdsr(**kw) -> MDSR:
    """MDSR: 80 blocks, 64 features (7.95M params)."""
    return MDSR((2, 3, 4), n_resblocks=80, n_feats=64, **kw)


for _factory in (edsr_baseline, edsr, mdsr_baseline, mdsr):
    if _factory.__doc__ is not None:  # python -OO strips docstrings
        _factory.__doc__ += _FACTORY_KWARGS


PRESETS = {
    "edsr_baseline": edsr_baseline,
    "edsr": edsr,
    "mdsr_baseline": mdsr_baseline,
    "mdsr": mdsr,
}


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameters; the published counts exclude the frozen mean shifts."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
