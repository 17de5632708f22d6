"""Reading, writing and matching checkpoints.

Formats: the official EDSR-PyTorch `.pt` files (plain state_dicts), BasicSR's EDSR layout
(`conv_first`, `body.i.conv1`, ..., usually wrapped in {"params": ...}), and `.safetensors`
(fastsr's own format, with the architecture in the metadata). Pickled files are read with
`torch.load(weights_only=True)` only: a file that needs arbitrary code to unpickle is refused.
The format is told by the content (zip / pickle vs. the safetensors header), the extension
only when the content is not recognized.

Loading is strict and checks values, not just names and shapes: every tensor must be a
dense floating-point tensor with finite values (a NaN or inf weight is a damaged file or a
diverged run; it would silently turn every output black), else CheckpointError names it.
`model_from_checkpoint` compares the file with the architecture it implies on the meta
device first, so a small file cannot make it allocate a huge model.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from fastsr.atomic import atomic_write
from fastsr.errors import CheckpointError
from fastsr.models.edsr import DIV2K_RGB_MEAN, EDSR, MDSR, SUPPORTED_SCALES, MeanShift

StateDict = dict[str, torch.Tensor]

# Keys that wrap the real state_dict in training checkpoints of common codebases.
_WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model")


def _sniff(path: Path) -> str | None:
    """'torch' (zip or pickle), 'safetensors' (8-byte header length, then JSON) or None."""
    with open(path, "rb") as f:
        head = f.read(9)
        size = os.fstat(f.fileno()).st_size
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "torch"
    return None


def read_checkpoint(path: str | os.PathLike) -> tuple[StateDict, dict[str, str]]:
    """Read a state_dict and its metadata from `.safetensors`, `.pt` or `.pth`.

    Returns (state_dict with CPU tensors, metadata); metadata is empty for pickled files.
    Raises CheckpointError with the file name for anything unreadable or unsafe.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    suffix = path.suffix.lower()
    try:
        kind = _sniff(path) or {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch"}.get(suffix)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if kind == "safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({_brief(e)})") from None
        return sd, meta
    if kind is None:
        raise CheckpointError(f"{path}: unknown checkpoint extension {path.suffix!r}; expected .safetensors, .pt or .pth")
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4 ...": noise, the load decides
            warnings.simplefilter("ignore")
            with open(path, "rb") as f:  # a file, not a name: torch.load goes by a .safetensors suffix
                obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # The weights-only unpickler names the global it refused ("GLOBAL print was not an
        # allowed global", "GLOBAL posix.system whose module posix is blocked"); any other
        # unpickling failure is a damaged or foreign file.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise CheckpointError(
                f"{path}: refused: the file holds pickled code ({found.group(1)}), which could run when "
                "loaded; fastsr reads .pt/.pth with torch.load(weights_only=True) only"
            ) from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (unpickling failed)") from None
    except Exception as e:  # corrupt zip, truncated file, not a torch file at all
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {_brief(e)})") from None
    return _unwrap(obj, path), {}


def _brief(err: BaseException, limit: int = 200) -> str:
    """A library's error message on one line, cut to `limit` characters."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unwrap(obj, path: Path) -> StateDict:
    for _ in range(3):  # e.g. {"state_dict": {"params": ...}}; an empty "params_ema" is passed over
        inner = [obj[k] for k in _WRAPPER_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict) and obj[k]]
        if not inner:
            break
        obj = inner[0]
    if not isinstance(obj, dict) or not obj:
        what = "an empty dict" if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: expected a state_dict (a dict of tensors), got {what}")
    bad = [repr(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not name -> tensor: {', '.join(bad[:5])}")
    # DataParallel / DDP prefixes
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


# ---------------------------------------------------------------------------------------
# Recognizing what a state_dict holds
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchSpec:
    """What a state_dict seems to hold: kind ('edsr' | 'mdsr' | 'basicsr-edsr'), sizes, scales."""

    kind: str
    n_resblocks: int
    n_feats: int
    scales: tuple[int, ...]

    def tag(self) -> str:
        if self.kind == "mdsr":
            return f"mdsr r{self.n_resblocks}f{self.n_feats} (scales {','.join(map(str, self.scales))})"
        prefix = "BasicSR " if self.kind == "basicsr-edsr" else ""
        scale = self.scales[0] if self.scales else "?"
        return f"{prefix}r{self.n_resblocks}f{self.n_feats}x{scale}"


def _upsampler_scale(sd: StateDict, prefix: str, n_feats: int) -> int | None:
    w0 = sd.get(f"{prefix}0.weight")
    if w0 is None or n_feats <= 0:
        return None
    ratio = w0.shape[0] // n_feats
    if ratio == 9:
        return 3
    if ratio == 4:  # one [conv, PixelShuffle(2)] pair per factor 2: keys 0, 2, 4, ...
        stages = 1
        while f"{prefix}{2 * stages}.weight" in sd:
            stages += 1
        return 2 ** stages
    return None


def infer_arch(sd: StateDict) -> ArchSpec | None:
    """Guess the architecture from key names and shapes; None if it is not EDSR/MDSR-like."""
    try:
        if "conv_first.weight" in sd:  # BasicSR
            f = sd["conv_first.weight"].shape[0]
            b = len({m.group(1) for k in sd if (m := re.match(r"body\.(\d+)\.conv1\.weight$", k))})
            s = _upsampler_scale(sd, "upsample.", f)
            return ArchSpec("basicsr-edsr", b, f, (s,) if s else ())
        if "head.0.weight" not in sd:
            return None
        f = sd["head.0.weight"].shape[0]
        b = len({m.group(1) for k in sd if (m := re.match(r"body\.(\d+)\.body\.0\.weight$", k))})
        if any(k.startswith("pre_process.") for k in sd):
            idx = sorted({int(m.group(1)) for k in sd if (m := re.match(r"upsample\.(\d+)\.", k))})
            scales = tuple(s for i in idx if (s := _upsampler_scale(sd, f"upsample.{i}.", f)))
            return ArchSpec("mdsr", b, f, scales)
        s = _upsampler_scale(sd, "tail.0.", f)
        return ArchSpec("edsr", b, f, (s,) if s else ())
    except (AttributeError, IndexError, TypeError):
        return None


def metadata_arch(meta: dict[str, str], name: str) -> ArchSpec | None:
    """The architecture fastsr wrote into a safetensors file's metadata (`save_safetensors`),
    or None when the metadata does not state one (official, BasicSR and foreign files)."""
    kind = meta.get("arch")
    if kind is None:
        return None
    if kind not in ("edsr", "mdsr"):
        raise CheckpointError(f"{name}: metadata arch={kind!r}; expected 'edsr' or 'mdsr'")
    try:
        n_resblocks, n_feats = int(meta["n_resblocks"]), int(meta["n_feats"])
        scales = tuple(int(s) for s in json.loads(meta["scales"]))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{name}: metadata says arch={kind} but its sizes are unreadable "
                              f"({type(e).__name__}: {_brief(e, 80)})") from None
    if n_resblocks < 0 or n_feats <= 0 or not scales:
        raise CheckpointError(f"{name}: metadata sizes n_resblocks={n_resblocks}, n_feats={n_feats}, "
                              f"scales={list(scales)} are not an EDSR/MDSR")
    return ArchSpec(kind, n_resblocks, n_feats, scales)


def checkpoint_arch(sd: StateDict, meta: dict[str, str], name: str) -> ArchSpec:
    """The architecture a checkpoint holds: its metadata's when it states one (checked
    against the tensors: a contradiction is refused), else read from key names and shapes."""
    spec = infer_arch(sd)
    stated = metadata_arch(meta, name)
    if stated is not None and spec is not None and stated != spec:
        raise CheckpointError(f"{name}: the metadata says {stated.tag()}, the tensors hold {spec.tag()}")
    spec = stated or spec
    if spec is None:
        raise CheckpointError(f"{name}: {describe(sd)}")
    return spec


def describe(sd: StateDict) -> str:
    spec = infer_arch(sd)
    return f"looks like {spec.tag()}" if spec else "does not look like an EDSR/MDSR checkpoint"


def model_arch_tag(model: nn.Module) -> str:
    if isinstance(model, MDSR):
        return ArchSpec("mdsr", model.n_resblocks, model.n_feats, model.scales).tag()
    return ArchSpec("edsr", model.n_resblocks, model.n_feats, (model.scale,)).tag()


# ---------------------------------------------------------------------------------------
# BasicSR conversion
# ---------------------------------------------------------------------------------------

_BASICSR_RULES = [
    (r"^conv_first\.(weight|bias)$", r"head.0.\1"),
    (r"^body\.(\d+)\.conv1\.(weight|bias)$", r"body.\1.body.0.\2"),
    (r"^body\.(\d+)\.conv2\.(weight|bias)$", r"body.\1.body.2.\2"),
    (r"^upsample\.(\d+)\.(weight|bias)$", r"tail.0.\1.\2"),
]


def convert_basicsr(sd: StateDict, rgb_range: float = 255.0) -> StateDict:
    """BasicSR EDSR state_dict -> official layout.

    BasicSR's forward is `((x - mean) * img_range)` -> same convs -> `/ img_range + mean`
    with x in 0..1; with the default img_range = 255 its convs see exactly what the official
    model sees for inputs in 0..255, so the weights carry over unchanged and only the names
    and the (non-persistent in BasicSR) mean shift change. fastsr's model then takes 0..255
    input: `fastsr(x * 255) == basicsr(x) * 255`.
    """
    spec = infer_arch(sd)
    if spec is None or spec.kind != "basicsr-edsr":
        raise CheckpointError(f"not a BasicSR EDSR state_dict: {describe(sd)}")
    n_blocks = spec.n_resblocks
    out: StateDict = {}
    for key, value in sd.items():
        for pattern, repl in _BASICSR_RULES:
            if re.match(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
        else:
            m = re.match(r"^conv_after_body\.(weight|bias)$", key)
            n = re.match(r"^conv_last\.(weight|bias)$", key)
            if m:
                out[f"body.{n_blocks}.{m.group(1)}"] = value
            elif n:
                out[f"tail.1.{n.group(1)}"] = value
            else:
                raise CheckpointError(f"BasicSR state_dict has an unexpected key {key!r}")
    if rgb_range != _BASICSR_IMG_RANGE:
        # BasicSR's convs see (x - mean) * 255 for x in 0..1 whatever range fastsr's model
        # takes: for x * rgb_range in, the head's weights scale by 255 / rgb_range (its bias
        # stays) and the last conv's output by rgb_range / 255, so model(x * r) == r * basicsr(x).
        out["head.0.weight"] = out["head.0.weight"] * (_BASICSR_IMG_RANGE / rgb_range)
        for key in ("tail.1.weight", "tail.1.bias"):
            out[key] = out[key] * (rgb_range / _BASICSR_IMG_RANGE)
    for name, sign in (("sub_mean", -1), ("add_mean", 1)):
        shift = MeanShift(rgb_range, sign=sign)
        out[f"{name}.weight"], out[f"{name}.bias"] = shift.weight.detach().clone(), shift.bias.detach().clone()
    return out


_BASICSR_IMG_RANGE = 255.0  # BasicSR EDSR's img_range default, which its released models use


def implied_rgb_range(sd: StateDict) -> float | None:
    """The rgb_range an official-layout state_dict was trained with, read from its mean
    shifts (sub_mean.bias = -rgb_range * mean, add_mean.bias = +rgb_range * mean), or None
    when it has none, or biases that fit no single rgb_range (not the official mean shift)."""
    mean = torch.tensor(DIV2K_RGB_MEAN, dtype=torch.float64)
    ranges = []
    for key, sign in (("sub_mean.bias", -1.0), ("add_mean.bias", 1.0)):
        if key in sd and tuple(sd[key].shape) == (3,):
            ranges.append(sd[key].double() * sign / mean)
    if not ranges:
        return None
    r = torch.cat(ranges)
    value = float(r.mean())
    if not (value > 0 and float((r - value).abs().max()) <= _RANGE_RTOL * value):
        return None  # not the official fixed mean shift (other code trained it): nothing to read
    # Stored in fp16 (the shipped files) 255 comes back as ~254.97; this close to an integer, it is one.
    return float(round(value)) if abs(value - round(value)) <= _RANGE_RTOL * value else value


# fp16 biases carry ~5e-4 relative error: the mean shifts of one rgb_range agree within this.
_RANGE_RTOL = 2e-3


# ---------------------------------------------------------------------------------------
# Loading into a model
# ---------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What `load_weights` did: keys loaded, and keys skipped with the reason."""

    loaded: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors, skipped {len(self.skipped)}"]
        lines += [f"  skipped {k}: {why}" for k, why in self.skipped]
        return "\n".join(lines)


def _is_upsampler_key(model: nn.Module, key: str) -> bool:
    if isinstance(model, MDSR):
        return key.startswith("upsample.")
    return key.startswith("tail.0.")


def _mismatch_message(model: nn.Module, sd: StateDict, source: str) -> str | None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} (file {tuple(sd[k].shape)}, model {tuple(own[k].shape)})"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    if not (missing or unexpected or shapes):
        return None

    def few(items: list[str]) -> str:
        return ", ".join(items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")

    parts = []
    if missing:
        parts.append(f"missing keys: {few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {few(unexpected)}")
    if shapes:
        parts.append(f"mis-shaped: {few(shapes)}")
    return (
        f"{source} does not match the model ({model_arch_tag(model)}): the file {describe(sd)}; "
        + "; ".join(parts)
    )


def load_weights(
    model: nn.Module,
    source: str | os.PathLike | StateDict,
    *,
    partial_upsampler: bool = False,
    layout: str = "auto",
) -> LoadReport:
    """Load official, BasicSR, super-image (layout="super-image") or fastsr weights into
    `model` strictly.

    partial_upsampler=True is the paper's fine-tuning start (x2 weights -> x3/x4 model):
    everything but the upsampler must match; upsampler tensors that do not fit are skipped
    and listed in the report. Any other mismatch raises CheckpointError naming the
    missing / unexpected / mis-shaped keys and what the file seems to hold.
    """
    name = str(source) if not isinstance(source, dict) else "state_dict"
    sd = read_checkpoint(source)[0] if not isinstance(source, dict) else dict(source)
    _check_values(sd, name)
    return _load(model, sd, name, partial_upsampler, _check_layout(layout))


def _check_values(sd: StateDict, name: str) -> None:
    """Every tensor of the file is dense, floating point and finite; else CheckpointError
    naming it as the file does (before any renaming; skipped upsampler tensors included)."""
    for key, value in sd.items():
        if value.layout != torch.strided or value.is_meta or value.is_quantized:
            kind = "meta" if value.is_meta else "quantized" if value.is_quantized else str(value.layout)
            raise CheckpointError(f"{name}: tensor {key} is a {kind} tensor; expected plain dense weights")
        if not value.is_floating_point():
            raise CheckpointError(
                f"{name}: tensor {key} has dtype {str(value.dtype).replace('torch.', '')}; weights must be floating point"
            )
        exact = value.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        # float8 has no isfinite kernel: checked in float32, which holds every float8 value.
        bad = value.numel() - int(torch.isfinite(value if exact else value.float()).sum())
        if bad:
            raise CheckpointError(
                f"{name}: tensor {key} holds {bad} NaN/inf value(s) of {value.numel()}; "
                "the file is damaged or comes from a run that diverged"
            )


LAYOUTS = ("auto", "official", "basicsr", "super-image")


def convert_super_image(sd: StateDict) -> StateDict:
    """super-image (huggingface `super-image`) EDSR state_dict -> official layout for rgb_range 1.

    super-image's EDSR has exactly the official key names, mean-shift convs included, but its
    forward skips the mean shift and takes and returns 0..1: `head -> body -> tail` on x in
    0..1. With identity mean shifts, fastsr's EDSR(rgb_range=1) computes exactly that. The
    keys cannot tell the two apart, so this is asked for by name (layout="super-image").
    """
    spec = infer_arch(sd)
    if spec is None or spec.kind not in ("edsr", "mdsr"):
        raise CheckpointError(f"not an EDSR state_dict in the official / super-image naming: {describe(sd)}")
    out = dict(sd)
    for name in ("sub_mean", "add_mean"):
        out[f"{name}.weight"] = torch.eye(3).view(3, 3, 1, 1)
        out[f"{name}.bias"] = torch.zeros(3)
    return out


def _check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return layout


def _to_official(sd: StateDict, rgb_range: float, name: str, layout: str = "auto") -> StateDict:
    """BasicSR / super-image -> official names and numerics (official as given), errors naming
    the source. layout "auto" tells BasicSR by its key names; super-image must be named."""
    spec = infer_arch(sd)
    if layout == "super-image":
        try:
            return convert_super_image(sd)
        except CheckpointError as e:
            raise CheckpointError(f"{name}: {e}") from None
    if layout == "basicsr" and (spec is None or spec.kind != "basicsr-edsr"):
        raise CheckpointError(f"{name}: layout='basicsr' but {describe(sd)}")
    if layout == "official" and spec is not None and spec.kind == "basicsr-edsr":
        raise CheckpointError(f"{name}: layout='official' but {describe(sd)}")
    if spec is None or spec.kind != "basicsr-edsr":
        return sd
    try:
        return convert_basicsr(sd, rgb_range)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None


def _load(model: nn.Module, sd: StateDict, name: str, partial_upsampler: bool, layout: str = "auto") -> LoadReport:
    model_range = float(getattr(model, "rgb_range", 255.0))
    if layout == "super-image" and model_range != 1.0:
        raise CheckpointError(f"{name}: super-image weights take 0..1 input: build the model with rgb_range=1 "
                              f"(it has rgb_range={model_range:g}), or use model_from_checkpoint")
    sd = _to_official(sd, model_range, name, layout)
    file_range = implied_rgb_range(sd)
    if file_range is not None and file_range != model_range:
        raise CheckpointError(f"{name} was trained with rgb_range={file_range:g} (from its mean shift), the model "
                              f"has rgb_range={model_range:g}: build the model with rgb_range={file_range:g} "
                              "(model_from_checkpoint reads it from the file)")
    report = LoadReport()
    if partial_upsampler:
        own = model.state_dict()
        for key in list(sd):
            if _is_upsampler_key(model, key) and (key not in own or own[key].shape != sd[key].shape):
                report.skipped.append((key, "upsampler of another scale"))
                del sd[key]
        for key in own:
            if _is_upsampler_key(model, key) and key not in sd:
                if not any(key == k for k, _ in report.skipped):
                    report.skipped.append((key, "not in the file; kept the model's initialization"))
                sd[key] = own[key]
    msg = _mismatch_message(model, sd, name)
    if msg:
        raise CheckpointError(msg)
    model.load_state_dict(sd, strict=True)
    skipped = {k for k, _ in report.skipped}
    report.loaded = [k for k in sd if k not in skipped]
    return report


def model_from_checkpoint(
    source: str | os.PathLike,
    *,
    res_scale: float | None = None,
    rgb_range: float | None = None,
    layout: str = "auto",
    **model_kwargs,
) -> nn.Module:
    """Build the model a checkpoint holds and load it strictly.

    The architecture comes from the safetensors metadata when fastsr wrote the file
    (checked against the tensors), otherwise from key names and shapes. res_scale is not stored in official files:
    it defaults to the paper's (0.1 for 256 features, else 1). rgb_range (the input's
    value range, 255: 0..255) comes from the metadata, else from the file's mean shift
    (an official model trained with --rgb_range 1 has sub_mean.bias = -mean); a BasicSR
    file has neither, so it is the caller's (default 255) and the weights are rescaled to it.
    layout: "auto" (official, BasicSR or fastsr, told apart by key names), "official",
    "basicsr", or "super-image" (official key names, no mean shift, 0..1 input: rgb_range 1).
    A res_scale that neither the caller nor the metadata gives is guessed, with a warning.
    """
    _check_layout(layout)
    name = str(source)
    sd, meta = read_checkpoint(source)
    _check_values(sd, name)
    spec = checkpoint_arch(sd, meta, name)
    if not spec.scales:
        raise CheckpointError(f"{name}: {describe(sd)}, but has no upsampler of a known scale "
                              f"({', '.join(f'x{k}' for k in SUPPORTED_SCALES)})")
    unsupported = [k for k in spec.scales if k not in SUPPORTED_SCALES]
    if unsupported:
        raise CheckpointError(f"{name}: {describe(sd)}: x{unsupported[0]} is not supported "
                              f"(scales: {', '.join(f'x{k}' for k in SUPPORTED_SCALES)})")
    if res_scale is None and "res_scale" not in meta:
        res_scale = 0.1 if spec.n_feats == 256 else 1.0
        warnings.warn(f"{name}: the file does not store res_scale; using {res_scale:g}, the paper's for "
                      f"{spec.n_feats} features (pass res_scale= if it was trained with another)", stacklevel=2)
    elif res_scale is None:
        res_scale = _meta_number(meta, "res_scale", 1.0, name)
    # None for BasicSR (no mean shift stored) and for super-image (stored but never applied).
    from_bias = implied_rgb_range(sd) if layout != "super-image" else None
    if layout == "super-image":
        if rgb_range not in (None, 1, 1.0):
            raise CheckpointError(f"{name}: super-image weights take 0..1 input (rgb_range=1), "
                                  f"rgb_range={rgb_range:g} was asked for")
        rgb_range = 1.0
    from_meta = _meta_number(meta, "rgb_range", 0.0, name) or None
    if from_meta is not None and from_bias is not None and from_meta != from_bias:
        raise CheckpointError(f"{name}: metadata says rgb_range={from_meta:g}, its mean shift {from_bias:g}")
    found = from_meta or from_bias
    if rgb_range is not None and found is not None and float(rgb_range) != found:
        raise CheckpointError(f"{name} was trained with rgb_range={found:g}; rgb_range={rgb_range:g} was asked for")
    rgb_range = float(found or rgb_range or 255.0)
    sd = _to_official(sd, rgb_range, name, layout)

    def build(**kw) -> nn.Module:
        if spec.kind == "mdsr":
            return MDSR(spec.scales, spec.n_resblocks, spec.n_feats, rgb_range=rgb_range, **kw)
        return EDSR(spec.scales[0], spec.n_resblocks, spec.n_feats, res_scale, rgb_range=rgb_range, **kw)

    # Shapes first, on the meta device (no memory): the file's names and shapes only imply
    # the architecture, and a few small tensors can claim thousands of blocks of 4096 features.
    with torch.device("meta"):
        msg = _mismatch_message(build(), sd, name)
    if msg:
        raise CheckpointError(msg)
    model = build(**model_kwargs)
    _load(model, sd, name, partial_upsampler=False, layout="official")  # converted above
    return model


def _meta_number(meta: dict[str, str], key: str, default: float, name: str) -> float:
    """A positive finite number from safetensors metadata (written by fastsr, read from anyone)."""
    if key not in meta:
        return default
    try:
        value = float(meta[key])
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise CheckpointError(f"{name}: metadata {key}={meta[key]!r} is not a positive finite number")
    return value


def save_safetensors(
    model: nn.Module, path: str | os.PathLike, *, half: bool = False, extra_metadata: dict[str, str] | None = None
) -> Path:
    """Save `model`'s state_dict as safetensors (atomically) with its architecture in the metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if half:
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    meta = {
        "format": "fastsr",
        "arch": "mdsr" if isinstance(model, MDSR) else "edsr",
        "n_resblocks": str(model.n_resblocks),
        "n_feats": str(model.n_feats),
        "scales": json.dumps(list(model.scales) if isinstance(model, MDSR) else [model.scale]),
        "res_scale": repr(float(model.res_scale)),
        "rgb_range": repr(float(model.rgb_range)),
    }
    meta.update(extra_metadata or {})
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))
    return path
