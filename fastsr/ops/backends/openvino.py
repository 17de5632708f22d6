"""OpenVINO for CPU inference: the eager graph of a model's weights, compiled by OpenVINO.

A whole-model implementation (fastsr.ops.dispatch's "model" op): the network's eager
modules (the official math, no fused ops) are converted once per (scale branch, weights)
with a dynamic input shape, then compiled per input shape and precision: "f32" (the f32
precision hint: fp32 throughout) or "bf16" (OpenVINO's bf16 inference on CPUs with bf16
instructions). Weights are copied into the converted model (share_weights=False), and a
change of any parameter (its version counter) converts again, so a stale graph never runs.
Converted graphs are also saved as OpenVINO IR under `ir_cache_dir()`, named by a hash of
the weights' bytes and the versions, so a later process skips the conversion.
Inference only: no autograd. Needs the optional extra fastsr[openvino].
"""
from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path

import torch
import torch.nn as nn

PRECISIONS = {torch.float32: "f32", torch.bfloat16: "bf16"}


class _Eager(nn.Module):
    """The model's eager forward at one scale branch, as the module OpenVINO converts."""

    def __init__(self, model: nn.Module, scale_idx: int):
        super().__init__()
        self.model, self.scale_idx = model, scale_idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model._forward_eager(x, self.scale_idx)


class OpenVINOForward:
    """Compiled OpenVINO models of one fastsr model, cached per shape and precision.

    The caches live on the model (`model._openvino`), so they go with it; at most
    `max_shapes` compiled shapes are kept (least recently used dropped first)."""

    def __init__(self, model: nn.Module, max_shapes: int = 8):
        self.model, self.max_shapes = model, max_shapes
        self._converted: dict[tuple, object] = {}
        self._compiled: dict[tuple, object] = {}

    def _weights(self) -> tuple:
        from fastsr.models.fused import weights_key

        return weights_key(self.model)

    def _ov_model(self, scale_idx: int):
        key = (scale_idx, self._weights())
        if key not in self._converted:
            self._converted = {k: v for k, v in self._converted.items() if k[1] == key[1]}  # drop stale weights
            self._converted[key] = self._load_or_convert(scale_idx)
        return self._converted[key]

    def _convert(self, scale_idx: int):
        import openvino as ov

        example = torch.rand(1, 3, 16, 16) * float(self.model.rgb_range)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TorchScript tracing's notes on the shape checks
            return ov.convert_model(_Eager(self.model, scale_idx).eval(), example_input=example,
                                    input=[ov.PartialShape([-1, 3, -1, -1])], share_weights=False)

    def _load_or_convert(self, scale_idx: int):
        """The converted graph from the IR cache (`ir_cache_dir()`), else converted (~10 s
        for EDSR-baseline on 2 cores: TorchScript tracing) and saved there."""
        import openvino as ov

        folder = ir_cache_dir()
        if folder is None:
            return self._convert(scale_idx)
        path = folder / f"{_graph_digest(self.model, scale_idx)}.xml"
        if path.is_file():
            try:
                return ov.Core().read_model(str(path))
            except RuntimeError:
                pass  # damaged or from an incompatible OpenVINO: converted again and overwritten
        graph = self._convert(scale_idx)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # Written under temporary names, then the .bin and, last, the .xml renamed into
            # place: a reader finds a complete pair or no .xml at all.
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.xml")
            ov.save_model(graph, str(tmp), compress_to_fp16=False)
            os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
            os.replace(tmp, path)
        except (OSError, RuntimeError):
            pass  # a read-only cache: the graph still serves this process
        return graph

    def compiled(self, shape: tuple[int, ...], scale_idx: int, precision: str) -> "_Compiled":
        """The compiled model for inputs of `shape` (N, 3, H, W), compiled on first use."""
        import openvino as ov

        key = (tuple(shape), scale_idx, precision, self._weights())
        found = self._compiled.pop(key, None)
        if found is None:
            graph = self._ov_model(scale_idx).clone()
            graph.reshape(ov.PartialShape(list(shape)))
            threads = torch.get_num_threads()
            found = _Compiled(ov.Core().compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                                      "INFERENCE_NUM_THREADS": threads}), shape)
            while len(self._compiled) >= self.max_shapes:
                self._compiled.pop(next(iter(self._compiled)))
        self._compiled[key] = found  # most recently used last
        return found

    def clear_compiled(self) -> None:
        """Drop every compiled shape (each holds its buffers: ~2.3 KB per input pixel for
        EDSR-baseline x2 in fp32); the converted graph stays, so the next shape only compiles."""
        self._compiled.clear()

    def __call__(self, x: torch.Tensor, scale_idx: int, precision: str) -> torch.Tensor:
        """x: (N, 3, H, W) CPU float in 0..rgb_range -> the network's output, x's dtype, NCHW."""
        return self.compiled(tuple(x.shape), scale_idx, precision)(x)


class _Compiled:
    """One compiled shape: its infer request and an NCHW fp32 input buffer the request reads in
    place. Per call, one pass writes x into the buffer (any memory format, any float dtype) and
    one pass copies the output out in x's dtype; OpenVINO's own input and output copies
    (share_inputs/share_outputs off, its defaults) are skipped. The lock keeps two threads
    from sharing the request and the buffer at once."""

    def __init__(self, model, shape: tuple[int, ...]):
        self.model = model
        self.request = model.create_infer_request()
        self.buffer = torch.empty(shape, dtype=torch.float32)
        self.lock = threading.Lock()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.buffer.copy_(x.detach())
            out = self.request.infer([self.buffer.numpy()], share_inputs=True, share_outputs=True)[0]
            # The output array is the request's own buffer, rewritten by the next call: copied.
            return torch.from_numpy(out).to(x.dtype, copy=True)


def ir_cache_dir() -> Path | None:
    """Where converted graphs are kept across processes: $FASTSR_OPENVINO_CACHE (empty:
    nowhere), default ~/.cache/fastsr/openvino."""
    value = os.environ.get("FASTSR_OPENVINO_CACHE")
    if value == "":
        return None
    return Path(value) if value else Path.home() / ".cache" / "fastsr" / "openvino"


def _graph_digest(model: nn.Module, scale_idx: int) -> str:
    """SHA-256 of what the converted graph depends on: the weights' bytes, the architecture
    and scale branch, and the fastsr, torch and OpenVINO versions."""
    import openvino as ov

    from fastsr import __version__

    digest = hashlib.sha256(f"{type(model).__name__}|{model.arch}|{scale_idx}|{model.rgb_range}|{__version__}|"
                            f"{torch.__version__}|{ov.__version__}".encode())
    for name, t in model.state_dict().items():
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        # Flattened first: a channels-last (3, 3, 1, 1) weight is "contiguous" with strides
        # (3, 1, 3, 3), and a dtype view needs a unit last stride.
        flat = t.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:32]


_RUNNER = "_openvino"  # where a model keeps its OpenVINOForward (its __dict__)


def openvino_forward(model: nn.Module) -> OpenVINOForward:
    """The model's OpenVINOForward, created on first use."""
    runner = model.__dict__.get(_RUNNER)
    if runner is None:
        runner = OpenVINOForward(model)
        model.__dict__[_RUNNER] = runner  # not a submodule: no state_dict entry, no .to()
    return runner


def clear_compiled_shapes(model: nn.Module) -> None:
    """`OpenVINOForward.clear_compiled` on the model's runner, if it has one (none is created)."""
    runner = model.__dict__.get(_RUNNER)
    if runner is not None:
        runner.clear_compiled()
