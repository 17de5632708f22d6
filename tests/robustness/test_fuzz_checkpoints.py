"""Fuzz and property tests for the checkpoint door: read_checkpoint, infer_arch,
convert_basicsr, load_weights, model_from_checkpoint and `fastsr upscale --weights`.

Contract for every file: the model it holds, loaded exactly, or CheckpointError with one
line that names the file (and the tensor, when one tensor is at fault); the CLI: exit 1,
one `fastsr: error: ...` line, no traceback. Never another exception, a hang, a huge
allocation, code run from a pickle, or NaN / inf / integer weights loaded silently.
safetensors and torch's zip files have no checksum over the tensor data, so a flipped bit
there may load as a slightly different (finite) model: for those only the contract is checked.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import resource
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st
from PIL import Image as PILImage

from fuzzing import flip_bits, flips, quick, write
from fastsr.checkpoints import (
    convert_basicsr,
    infer_arch,
    load_weights,
    model_from_checkpoint,
    read_checkpoint,
    save_safetensors,
)
from fastsr.cli import main
from fastsr.errors import CheckpointError
from fastsr.models.edsr import EDSR, MDSR


def tiny(kind: str = "edsr", scale: int = 2, blocks: int = 2, feats: int = 8) -> torch.nn.Module:
    model = MDSR((2, 3, 4), blocks, feats) if kind == "mdsr" else EDSR(scale, blocks, feats)
    with torch.no_grad():  # random values everywhere, so a wrong mapping cannot pass
        gen = torch.Generator().manual_seed(scale * 100 + blocks * 10 + feats)
        for p in model.parameters():
            if p.requires_grad:  # not the fixed mean shifts (BasicSR files do not hold them)
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def official(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def to_basicsr(sd: dict[str, torch.Tensor], blocks: int) -> dict[str, torch.Tensor]:
    """The BasicSR EDSR names of an official EDSR state_dict (no mean-shift tensors)."""
    out = {}
    for key, value in sd.items():
        for pattern, repl in [(r"^head\.0\.", "conv_first."), (rf"^body\.{blocks}\.", "conv_after_body."),
                              (r"^body\.(\d+)\.body\.0\.", r"body.\1.conv1."), (r"^body\.(\d+)\.body\.2\.", r"body.\1.conv2."),
                              (r"^tail\.0\.", "upsample."), (r"^tail\.1\.", "conv_last.")]:
            if re.match(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
    return out


def save(obj, path: Path) -> Path:
    if path.suffix == ".safetensors" and isinstance(obj, torch.nn.Module):
        save_safetensors(obj, path)
    else:
        torch.save(obj, path)
    return path


def load_or_error(path: Path, fn=model_from_checkpoint):
    """fn(path) under the contract: a result, or a one-line CheckpointError naming the file."""
    with quick(30):
        try:
            return fn(path)
        except CheckpointError as e:
            message = str(e)
            assert str(path) in message and "\n" not in message, message
            return e


def assert_same_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    assert set(own) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(own[key], value.to(own[key].dtype), rtol=0, atol=0, msg=key)


def assert_finite(model: torch.nn.Module) -> None:
    for key, value in model.state_dict().items():
        assert value.is_floating_point() and torch.isfinite(value).all(), key


# ----------------------------------------------------------------------------- good files

LAYOUTS = ["official.pt", "official.pth", "module.pt", "basicsr-params.pth", "basicsr-ema.pth",
           "nested.pt", "fastsr.safetensors", "half.safetensors", "mdsr.pt"]


def write_layout(tmp_path: Path, layout: str, scale: int, blocks: int, feats: int, ext: str | None = None):
    """Write a model in one layout; returns (path, the official state_dict it must load as)."""
    model = tiny("mdsr" if layout == "mdsr.pt" else "edsr", scale, blocks, feats)
    sd = official(model)
    stem, suffix = layout.rsplit(".", 1)
    path = tmp_path / f"{stem}.{ext or suffix}"
    if layout == "fastsr.safetensors":
        save_safetensors(model, path)
    elif layout == "half.safetensors":
        save_safetensors(model, path, half=True)
        sd = {k: v.half().float() for k, v in sd.items()}
    elif layout == "module.pt":
        torch.save({"module." + k: v for k, v in sd.items()}, path)
    elif layout.startswith("basicsr"):
        params = to_basicsr(sd, blocks)
        noise = {k: v + 1 for k, v in params.items()}  # "params" must lose to "params_ema"
        torch.save({"params_ema": params, "params": noise} if layout == "basicsr-ema.pth" else {"params": params}, path)
    elif layout == "nested.pt":
        torch.save({"state_dict": {"model": sd}, "epoch": 3}, path)
    else:
        torch.save(sd, path)
    return path, sd


@given(layout=st.sampled_from(LAYOUTS), scale=st.sampled_from([2, 3, 4]), blocks=st.integers(0, 3),
       feats=st.sampled_from([4, 8]), ext=st.sampled_from([None, "pt", "safetensors", "PTH"]))
def test_every_layout_loads_exactly(tmp_path, layout, scale, blocks, feats, ext):
    """Official, DataParallel, BasicSR (params / params_ema), nested and safetensors files,
    under their own or a wrong extension (the content decides), load to the same weights."""
    path, sd = write_layout(tmp_path, layout, scale, blocks, feats, ext)
    model = load_or_error(path)
    assert not isinstance(model, CheckpointError), model
    assert_same_weights(model, sd)
    assert isinstance(model, MDSR) == (layout == "mdsr.pt")
    target = tiny("mdsr" if layout == "mdsr.pt" else "edsr", scale, blocks, feats)
    load_weights(target, path)
    assert_same_weights(target, sd)


@given(scale=st.sampled_from([2, 3, 4]), blocks=st.integers(0, 3), dtype=st.sampled_from(
    [torch.float16, torch.bfloat16, torch.float64]))
def test_other_float_dtypes_are_converted(tmp_path, scale, blocks, dtype):
    sd = {k: v.to(dtype) for k, v in official(tiny("edsr", scale, blocks)).items()}
    model = load_or_error(save(sd, tmp_path / "w.pt"))
    assert not isinstance(model, CheckpointError), model
    assert_same_weights(model, {k: v.float() for k, v in sd.items()})


# ----------------------------------------------------------------------------- damaged files


def _bytes_of(write) -> bytes:
    buf = io.BytesIO()
    write(buf)
    return buf.getvalue()


def _safetensors_bytes() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return save_safetensors(tiny(), Path(d) / "w.safetensors").read_bytes()


CORPUS = {
    "zip.pt": lambda: _bytes_of(lambda f: torch.save(official(tiny()), f)),
    "legacy.pt": lambda: _bytes_of(lambda f: torch.save(official(tiny()), f, _use_new_zipfile_serialization=False)),
    "basicsr.pth": lambda: _bytes_of(lambda f: torch.save({"params": to_basicsr(official(tiny()), 2)}, f)),
    "w.safetensors": _safetensors_bytes,
}
_CORPUS_CACHE: dict[str, bytes] = {}


def corpus(name: str) -> bytes:
    if name not in _CORPUS_CACHE:
        _CORPUS_CACHE[name] = CORPUS[name]()
    return _CORPUS_CACHE[name]


def test_the_corpus_loads(tmp_path):
    for name in CORPUS:
        model = load_or_error(write(tmp_path, name, corpus(name)))
        assert not isinstance(model, CheckpointError), model
        assert_same_weights(model, official(tiny()))


@given(name=st.sampled_from(sorted(CORPUS)), where=flips)
def test_flipped_bits(tmp_path, name, where):
    model = load_or_error(write(tmp_path, name, flip_bits(corpus(name), where)))
    if not isinstance(model, CheckpointError):
        assert_finite(model)  # a flip into an exponent (NaN / inf) must have been refused
        assert model.state_dict().keys() == tiny().state_dict().keys()


@given(name=st.sampled_from(sorted(CORPUS)), keep=st.floats(0, 1, exclude_max=True))
def test_truncated(tmp_path, name, keep):
    data = corpus(name)
    assert isinstance(load_or_error(write(tmp_path, name, data[:int(keep * len(data))])), CheckpointError)


@given(name=st.sampled_from(sorted(CORPUS)), junk=st.binary(min_size=1, max_size=64), where=st.floats(0, 1))
def test_inserted_junk(tmp_path, name, junk, where):
    data = corpus(name)
    at = int(where * len(data))
    model = load_or_error(write(tmp_path, name, data[:at] + junk + data[at:]))
    if not isinstance(model, CheckpointError):
        assert_finite(model)


@pytest.mark.parametrize("name", ["w.pt", "w.pth", "w.safetensors"])
def test_zero_byte_and_text_files(tmp_path, name):
    for data in (b"", b"hello, not weights\n", b"{}", b"\x00" * 8 + b"{}"):
        assert isinstance(load_or_error(write(tmp_path, name, data)), CheckpointError)
    assert "no such checkpoint file" in str(load_or_error(tmp_path / ("missing_" + name)))


# ----------------------------------------------------------------------------- safetensors headers

DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "C64", "XX", ""]


def safetensors_file(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@given(entries=st.dictionaries(
    st.sampled_from(sorted(tiny().state_dict())) | st.text(max_size=8),
    st.fixed_dictionaries({
        "dtype": st.sampled_from(DTYPES),
        "shape": st.lists(st.integers(0, 2**40) | st.integers(0, 9), max_size=4),
        "data_offsets": st.tuples(st.integers(0, 300), st.integers(0, 300)) | st.tuples(st.integers(0, 2**63), st.integers(0, 2**64)),
    }), max_size=6),
    metadata=st.none() | st.dictionaries(st.sampled_from(["rgb_range", "res_scale", "format", "x"]), st.text(max_size=6)),
    body=st.binary(max_size=300))
@example(entries={"add_mean.bias": {"dtype": "F8_E4M3", "shape": [0], "data_offsets": (0, 0)}},
         metadata=None, body=b"")  # float8: torch has no isfinite for it
def test_safetensors_header_fuzz(tmp_path, entries, metadata, body):
    header = dict(entries)
    if metadata is not None:
        header["__metadata__"] = metadata
    path = write(tmp_path, "h.safetensors", safetensors_file(header, body))
    result = load_or_error(path, read_checkpoint)
    if not isinstance(result, CheckpointError):
        sd, meta = result
        assert all(isinstance(v, torch.Tensor) for v in sd.values())
    model = load_or_error(path)
    if not isinstance(model, CheckpointError):
        assert_finite(model)


@given(key=st.sampled_from(["rgb_range", "res_scale"]), value=st.sampled_from(
    ["nan", "inf", "-inf", "0", "-1", "abc", "", "1e400", "255", "0.5"]))
def test_safetensors_metadata_numbers(tmp_path, key, value):
    path = save_safetensors(tiny(), tmp_path / "m.safetensors", extra_metadata={key: value})
    model = load_or_error(path)
    if key == "rgb_range" and value == "0.5":
        # The tiny model's mean shift is for 255: metadata that contradicts it is refused.
        assert isinstance(model, CheckpointError) and "rgb_range=0.5, its mean shift 255" in str(model)
    elif value in ("255", "0.5"):
        assert getattr(model, key) == float(value)
    else:
        assert isinstance(model, CheckpointError) and key in str(model)


# ----------------------------------------------------------------------------- state_dict damage

# How a damage shows up: "key" = the message names the damaged tensor.
VALUE_DAMAGE = {
    "nan": lambda v: v.clone().fill_(float("nan")),
    "one-nan": lambda v: v.flatten().clone().index_fill_(0, torch.tensor([v.numel() - 1]), float("nan")).view_as(v),
    "inf": lambda v: v.clone().fill_(float("inf")),
    "-inf": lambda v: v.clone().fill_(float("-inf")),
    "int64": lambda v: (v * 100).long(),
    "int8": lambda v: v.to(torch.int8),
    "uint8": lambda v: v.to(torch.uint8),
    "bool": lambda v: v > 0,
    "complex": lambda v: torch.complex(v, v),
    "sparse": lambda v: v.to_sparse(),
}
SHAPE_DAMAGE = {
    "drop": None,
    "flat": lambda v: v.flatten(),
    "scalar": lambda v: v.flatten()[0].clone(),
    "grow": lambda v: torch.cat([v, v]),
    "empty": lambda v: v[:0],
}


@given(key_index=st.integers(0, 10**6), damage=st.sampled_from(sorted(VALUE_DAMAGE)),
       layout=st.sampled_from(["official", "basicsr"]), via=st.sampled_from(["model_from_checkpoint", "load_weights"]))
def test_bad_values_are_refused_naming_the_tensor(tmp_path, key_index, damage, layout, via):
    sd = official(tiny())
    if layout == "basicsr":
        sd = to_basicsr(sd, 2)
    key = sorted(sd)[key_index % len(sd)]
    sd[key] = VALUE_DAMAGE[damage](sd[key])
    path = save(sd, tmp_path / "bad.pth")
    fn = model_from_checkpoint if via == "model_from_checkpoint" else lambda p: load_weights(tiny(), p)
    err = load_or_error(path, fn)
    assert isinstance(err, CheckpointError), f"{damage} in {key} was loaded"
    assert f"tensor {key} " in str(err), str(err)  # named as in the file, BasicSR names too


@given(key_index=st.integers(0, 10**6), damage=st.sampled_from(sorted(SHAPE_DAMAGE)),
       extra=st.none() | st.sampled_from(["head.1.weight", "body.7.body.0.weight", "foo", "tail.0.9.bias"]),
       via=st.sampled_from(["model_from_checkpoint", "load_weights"]))
def test_wrong_names_and_shapes_are_refused(tmp_path, key_index, damage, extra, via):
    model = tiny()
    sd = official(model)
    key = sorted(sd)[key_index % len(sd)]
    if SHAPE_DAMAGE[damage] is None:
        del sd[key]
    else:
        sd[key] = SHAPE_DAMAGE[damage](sd[key])
        assume(sd[key].shape != model.state_dict()[key].shape)  # "flat" of a bias is no damage
    if extra:
        sd[extra] = torch.zeros(3)
    path = save(sd, tmp_path / "bad.pt")
    fn = model_from_checkpoint if via == "model_from_checkpoint" else lambda p: load_weights(tiny(), p)
    result = load_or_error(path, fn)
    if not isinstance(result, CheckpointError):
        # Only one way to load something here: a damage that is still a consistent smaller
        # model (e.g. the last block dropped) rebuilt by model_from_checkpoint, loaded exactly.
        assert via == "model_from_checkpoint"
        assert_same_weights(result, sd)


@pytest.mark.parametrize("obj", [
    [1, 2], (torch.zeros(1),), torch.zeros(3), None, 3, "weights", {}, {"params": {}}, {"params": "x"},
    {1: torch.zeros(1)}, {"head.0.weight": [1.0]}, {"state_dict": {"state_dict": {"state_dict": {}}}},
], ids=lambda o: type(o).__name__ + str(len(o) if hasattr(o, "__len__") else ""))
def test_non_state_dict_top_level(tmp_path, obj):
    err = load_or_error(save(obj, tmp_path / "odd.pt"))
    assert isinstance(err, CheckpointError)


def test_a_small_file_cannot_claim_a_huge_model(tmp_path):
    """4096 features x 500 blocks would be 600 GB of weights; the file is a few MB.

    Run in a child process with its address space capped, so that a regression fails this
    test with a MemoryError instead of taking the CI machine's memory (it did, once).
    """
    sd = {"head.0.weight": torch.zeros(4096, 3, 3, 3), "tail.0.0.weight": torch.zeros(4 * 4096)}
    sd.update({f"body.{i}.body.0.weight": torch.zeros(1) for i in range(500)})
    path = save(sd, tmp_path / "claims.pt")
    code = ("import sys\nfrom fastsr.checkpoints import model_from_checkpoint\nfrom fastsr.errors import CheckpointError\n"
            "try:\n    model_from_checkpoint(sys.argv[1])\nexcept CheckpointError as e:\n    print('refused:', e)\n")

    def cap_memory():
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    with quick(300):
        run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                             timeout=300, preexec_fn=cap_memory)
    assert run.returncode == 0 and run.stdout.startswith(f"refused: {path} does not match"), run.stderr[-3000:]


# ----------------------------------------------------------------------------- pickled code


class RunsCode:
    """Unpickling this runs a shell command (the classic malicious .pt)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickled_code_files(marker: Path) -> dict[str, bytes]:
    evil = RunsCode(marker)
    files = {f"raw-protocol{p}.pt": pickle.dumps({"head.0.weight": evil}, protocol=p) for p in range(6)}
    files["zip.pt"] = _bytes_of(lambda f: torch.save({"head.0.weight": torch.zeros(1), "x": evil}, f))
    files["legacy.pt"] = _bytes_of(lambda f: torch.save({"x": evil}, f, _use_new_zipfile_serialization=False))
    files["wrapper.pth"] = _bytes_of(lambda f: torch.save({"params": official(tiny()), "opt": evil}, f))
    files["named.safetensors"] = files["zip.pt"]  # the content decides, not the name
    return files


@pytest.mark.parametrize("name", sorted(pickled_code_files(Path("m"))))
def test_pickled_code_is_refused_and_never_runs(tmp_path, name):
    marker = tmp_path / "payload-ran"
    path = write(tmp_path, name, pickled_code_files(marker)[name])
    err = load_or_error(path)
    assert isinstance(err, CheckpointError)
    if not name.startswith("raw-protocol"):  # torch's own files name the refused global
        assert "refused" in str(err) and "system" in str(err), str(err)
    assert not marker.exists(), "the pickle's payload ran"


def test_cli_refuses_pickled_code(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    weights = write(tmp_path, "evil.pt", pickled_code_files(marker)["zip.pt"])
    rc, errors = run_cli(tmp_path, capsys, weights)
    assert rc == 1 and len(errors) == 1 and "refused" in errors[0] and str(weights) in errors[0]
    assert not marker.exists()


# ----------------------------------------------------------------------------- random state_dicts

KEYS = sorted(set(tiny().state_dict()) | set(to_basicsr(official(tiny()), 2)) | {
    "tail.0.2.weight", "upsample.0.0.weight", "upsample.1.0.weight", "pre_process.0.0.weight",
    "module.head.0.weight", "body.9.body.0.weight"})


@st.composite
def state_dicts(draw):
    sd = {}
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=12, unique=True)):
        shape = draw(st.lists(st.integers(0, 40), max_size=4))
        dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool]))
        sd[key] = torch.zeros(shape).to(dtype) if draw(st.booleans()) else torch.full(shape, float("nan")).to(dtype)
    return sd


@given(sd=state_dicts())
def test_random_state_dicts(tmp_path, sd):
    spec = infer_arch(sd)  # never raises
    assert spec is None or spec.kind in ("edsr", "mdsr", "basicsr-edsr")
    try:
        convert_basicsr(sd)
    except CheckpointError:
        pass
    for fn in (lambda p: load_weights(tiny(), p), lambda p: load_weights(tiny(), p, partial_upsampler=True),
               model_from_checkpoint):
        result = load_or_error(save(sd, tmp_path / "r.pt"), fn)
        if isinstance(result, torch.nn.Module):
            assert_finite(result)


# ----------------------------------------------------------------------------- the command line


def run_cli(tmp_path: Path, capsys, weights: Path, scale: int = 2) -> tuple[int, list[str]]:
    image = tmp_path / "in.png"
    if not image.exists():
        PILImage.fromarray(np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(image)
    with quick(120):
        rc = main(["upscale", str(image), "-o", str(tmp_path / "out"), "--scale", str(scale), "--weights", str(weights)])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, [line for line in err.splitlines() if line.startswith("fastsr: error: ")]


@given(name=st.sampled_from(sorted(CORPUS)), how=st.sampled_from(["flip", "cut", "nan", "int", "shape", "good"]),
       where=st.floats(0, 1, exclude_max=True), scale=st.sampled_from([2, 3]))
def test_cli_weights(tmp_path, capsys, name, how, where, scale):
    """`fastsr upscale --weights FILE`: a good x2 file upscales at --scale 2 (and is refused at
    3, naming the scale); every damaged file is one error line naming it, and no output."""
    out = tmp_path / "out"
    for old in out.glob("*") if out.exists() else []:
        old.unlink()
    data = corpus(name)
    if how == "flip":
        data = bytearray(data)
        data[int(where * len(data))] ^= 0x40
        data = bytes(data)
    elif how == "cut":
        data = data[:int(where * len(data))]
    elif how in ("nan", "int", "shape"):
        sd = official(tiny())
        key = sorted(sd)[int(where * len(sd))]
        sd[key] = {"nan": VALUE_DAMAGE["one-nan"], "int": VALUE_DAMAGE["int64"], "shape": SHAPE_DAMAGE["grow"]}[how](sd[key])
        name = "damaged.pt"
        data = _bytes_of(lambda f: torch.save(sd, f))
    weights = write(tmp_path, name, data)
    expect_ok = not isinstance(load_or_error(weights), CheckpointError) and scale == 2
    rc, errors = run_cli(tmp_path, capsys, weights, scale)
    if expect_ok:
        assert rc == 0 and errors == []
        assert PILImage.open(out / "in_x2.png").size == (20, 24)
    else:
        assert rc == 1 and len(errors) == 1 and str(weights) in errors[0], errors
        assert not list(out.glob("*.png")) if out.exists() else True
