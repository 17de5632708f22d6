"""OpenVINO for CPU inference: the eager graph of a model's weights, compiled by OpenVINO.

A whole-model implementation (fastsr.ops.dispatch's "model" op): the network's eager
modules (the official math, no fused ops) are converted once per (scale branch, weights)
with a dynamic input shape, then compiled per input shape and precision: "f32" (the f32
precision hint: fp32 throughout) or "bf16" (OpenVINO's bf16 inference on CPUs with bf16
instructions). Weights are copied into the converted model (share_weights=False), and a
change of any parameter (its version counter) converts again, so a stale graph never runs.
Inference only: no autograd. Needs the optional extra fastsr[openvino].
"""
from __future__ import annotations

import importlib.util
import warnings

import torch
import torch.nn as nn

PRECISIONS = {torch.float32: "f32", torch.bfloat16: "bf16"}


def available() -> bool:
    return importlib.util.find_spec("openvino") is not None


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
        import openvino as ov

        key = (scale_idx, self._weights())
        if key not in self._converted:
            self._converted = {k: v for k, v in self._converted.items() if k[1] == key[1]}  # drop stale weights
            example = torch.rand(1, 3, 16, 16) * float(self.model.rgb_range)
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # TorchScript tracing's notes on the shape checks
                self._converted[key] = ov.convert_model(_Eager(self.model, scale_idx).eval(), example_input=example,
                                                        input=[ov.PartialShape([-1, 3, -1, -1])],
                                                        share_weights=False)
        return self._converted[key]

    def compiled(self, shape: tuple[int, ...], scale_idx: int, precision: str):
        """The compiled model for inputs of `shape` (N, 3, H, W), compiled on first use."""
        import openvino as ov

        key = (tuple(shape), scale_idx, precision, self._weights())
        found = self._compiled.pop(key, None)
        if found is None:
            graph = self._ov_model(scale_idx).clone()
            graph.reshape(ov.PartialShape(list(shape)))
            threads = torch.get_num_threads()
            found = ov.Core().compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                           "INFERENCE_NUM_THREADS": threads})
            while len(self._compiled) >= self.max_shapes:
                self._compiled.pop(next(iter(self._compiled)))
        self._compiled[key] = found  # most recently used last
        return found

    def __call__(self, x: torch.Tensor, scale_idx: int, precision: str) -> torch.Tensor:
        """x: (N, 3, H, W) CPU float in 0..rgb_range -> the network's output, x's dtype, NCHW."""
        compiled = self.compiled(tuple(x.shape), scale_idx, precision)
        out = compiled(x.detach().float().contiguous().numpy())[0]
        return torch.from_numpy(out).to(x.dtype)


def openvino_forward(model: nn.Module) -> OpenVINOForward:
    """The model's OpenVINOForward, created on first use."""
    runner = model.__dict__.get("_openvino")
    if runner is None:
        runner = OpenVINOForward(model)
        model.__dict__["_openvino"] = runner  # not a submodule: no state_dict entry, no .to()
    return runner
