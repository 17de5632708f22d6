"""Checkpoint compatibility: official layout, BasicSR conversion, partial loads, safetensors, safety."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsr
from fastsr.checkpoints import (
    convert_basicsr,
    describe,
    load_weights,
    model_from_checkpoint,
    read_checkpoint,
    save_safetensors,
)
from fastsr.errors import CheckpointError


def official_state_dict(model: nn.Module, seed: int = 0) -> dict:
    """A random state_dict with exactly the official names and shapes (real files can't be downloaded here)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


PRESETS = [
    ("edsr_baseline", 2), ("edsr_baseline", 3), ("edsr_baseline", 4),
    ("edsr", 2), ("edsr", 3), ("edsr", 4),
    ("mdsr_baseline", None), ("mdsr", None),
]


@pytest.mark.parametrize("name,scale", PRESETS)
def test_official_layout_loads_strictly_through_a_pt_file(tmp_path, name, scale):
    build = getattr(fastsr, name)
    sd = official_state_dict(build(scale) if scale else build())
    path = tmp_path / f"{name}_x{scale}.pt"
    torch.save(sd, path)  # what the official release ships: a plain state_dict
    model = model_from_checkpoint(path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert type(model).__name__ == ("MDSR" if scale is None else "EDSR")
    if scale:
        assert model.scale == scale
        assert model.res_scale == (0.1 if name == "edsr" else 1.0)


class BasicSREDSR(nn.Module):
    """BasicSR's EDSR forward, written out (input 0..1, img_range 255) to check the converter."""

    def __init__(self, scale: int, n_feats: int = 8, n_blocks: int = 2, res_scale: float = 1.0):
        super().__init__()
        self.mean = torch.tensor([0.4488, 0.4371, 0.4040]).view(1, 3, 1, 1)
        self.res_scale = res_scale
        self.conv_first = nn.Conv2d(3, n_feats, 3, 1, 1)
        self.body = nn.ModuleList(nn.ModuleDict({"conv1": nn.Conv2d(n_feats, n_feats, 3, 1, 1),
                                                 "conv2": nn.Conv2d(n_feats, n_feats, 3, 1, 1)})
                                  for _ in range(n_blocks))
        self.conv_after_body = nn.Conv2d(n_feats, n_feats, 3, 1, 1)
        ups = []
        if scale == 3:
            ups += [nn.Conv2d(n_feats, 9 * n_feats, 3, 1, 1), nn.PixelShuffle(3)]
        else:
            for _ in range(scale.bit_length() - 1):  # log2: one stage per factor 2
                ups += [nn.Conv2d(n_feats, 4 * n_feats, 3, 1, 1), nn.PixelShuffle(2)]
        self.upsample = nn.Sequential(*ups)
        self.conv_last = nn.Conv2d(n_feats, 3, 3, 1, 1)

    def forward(self, x):
        x = (x - self.mean) * 255.0
        x = self.conv_first(x)
        res = x
        for blk in self.body:
            res = res + self.res_scale * blk["conv2"](F.relu(blk["conv1"](res)))
        res = self.conv_after_body(res) + x
        return self.conv_last(self.upsample(res)) / 255.0 + self.mean


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_basicsr_conversion_gives_identical_outputs(tmp_path, scale):
    torch.manual_seed(scale)
    ref = BasicSREDSR(scale)
    path = tmp_path / "net_g.pth"
    torch.save({"params": ref.state_dict()}, path)  # BasicSR wraps weights in "params"
    model = model_from_checkpoint(path)
    assert model.scale == scale and model.n_resblocks == 2 and model.n_feats == 8
    x = torch.rand(2, 3, 7, 6)
    torch.testing.assert_close(model(x * 255) / 255, ref(x), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("rgb_range", [1.0, 2.0])
def test_basicsr_weights_serve_a_model_of_any_rgb_range(tmp_path, rgb_range):
    """BasicSR's convs see (x - mean) * 255 whatever the model's range: the converter rescales
    the head and the last conv, so model(x * r) == r * basicsr(x), from a file or into a model."""
    torch.manual_seed(7)
    ref = BasicSREDSR(2)
    path = tmp_path / "net_g.pth"
    torch.save({"params": ref.state_dict()}, path)
    x = torch.rand(1, 3, 9, 7)
    model = model_from_checkpoint(path, rgb_range=rgb_range)
    assert model.rgb_range == rgb_range
    torch.testing.assert_close(model(x * rgb_range) / rgb_range, ref(x), rtol=1e-5, atol=2e-6)
    into = fastsr.EDSR(2, 2, 8, rgb_range=rgb_range)
    load_weights(into, path)
    torch.testing.assert_close(into(x * rgb_range) / rgb_range, ref(x), rtol=1e-5, atol=2e-6)


def test_an_official_rgb_range_1_file_is_read_as_such(tmp_path):
    """The official code's --rgb_range 1 stores sub_mean.bias = -mean: model_from_checkpoint
    builds a 0..1 model from it, and loading it into a 0..255 model is refused by name."""
    trained = fastsr.EDSR(2, 2, 8, rgb_range=1.0)
    sd = official_state_dict(trained, seed=3)
    for key in ("sub_mean.weight", "sub_mean.bias", "add_mean.weight", "add_mean.bias"):
        sd[key] = trained.state_dict()[key]  # the mean shift is fixed, not trained
    path = tmp_path / "EDSR_x2_range1.pt"
    torch.save(sd, path)
    model = model_from_checkpoint(path)
    assert model.rgb_range == 1.0
    trained.load_state_dict(sd)
    x = torch.rand(2, 3, 6, 5)
    torch.testing.assert_close(model(x), trained(x), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match=r"trained with rgb_range=1 \(from its mean shift\), the model has "
                                              r"rgb_range=255"):
        load_weights(fastsr.EDSR(2, 2, 8), path)
    with pytest.raises(CheckpointError, match="trained with rgb_range=1; rgb_range=255 was asked for"):
        model_from_checkpoint(path, rgb_range=255)
    sd["add_mean.bias"] = sd["add_mean.bias"] * 255  # sub says 1, add says 255: not the official shift
    torch.save(sd, path)
    assert model_from_checkpoint(path).rgb_range == 255.0  # nothing to read: the default, as before


def test_shipped_fp16_weights_read_back_rgb_range_255():
    from fastsr.checkpoints import implied_rgb_range
    from fastsr.weights import default_weights

    for scale in (2, 3, 4):
        sd, meta = read_checkpoint(default_weights(scale))
        assert sd["sub_mean.bias"].dtype == torch.float16 and implied_rgb_range(sd) == 255.0 == float(meta["rgb_range"])
        assert model_from_checkpoint(default_weights(scale)).rgb_range == 255.0


def test_an_official_x8_file_loads_and_runs(tmp_path):
    """The official Upsampler takes any power of two: an x8 file has three conv+shuffle stages."""
    sd = official_state_dict(fastsr.EDSR(8, 1, 8), seed=8)
    assert {k for k in sd if k.startswith("tail.0.")} >= {"tail.0.4.weight", "tail.0.4.bias"}
    path = tmp_path / "edsr_x8.pt"
    torch.save(sd, path)
    model = model_from_checkpoint(path)
    assert model.scale == 8 and "x8" in describe(sd)
    assert model(torch.rand(1, 3, 4, 3) * 255).shape == (1, 3, 32, 24)
    sd16 = {**sd, "tail.0.6.weight": sd["tail.0.4.weight"], "tail.0.6.bias": sd["tail.0.4.bias"]}
    torch.save(sd16, path)
    with pytest.raises(CheckpointError, match=r"x16 is not supported \(scales: x2, x3, x4, x8\)"):
        model_from_checkpoint(path)


@pytest.mark.parametrize("scale", [8])
def test_basicsr_x8_conversion_gives_identical_outputs(tmp_path, scale):
    torch.manual_seed(scale)
    ref = BasicSREDSR(scale)
    path = tmp_path / "net_g.pth"
    torch.save({"params": ref.state_dict()}, path)
    model = model_from_checkpoint(path)
    x = torch.rand(1, 3, 5, 4)
    torch.testing.assert_close(model(x * 255) / 255, ref(x), rtol=1e-5, atol=2e-6)


def test_convert_basicsr_rejects_other_layouts():
    with pytest.raises(CheckpointError, match="not a BasicSR"):
        convert_basicsr(fastsr.EDSR(2, 1, 8).state_dict())


@pytest.mark.parametrize("target", [3, 4])
def test_x2_weights_start_an_x3_x4_model(target):
    x2 = fastsr.EDSR(2, 2, 8)
    model = fastsr.EDSR(target, 2, 8)
    init_tail = model.tail[0][0].weight.clone()
    report = load_weights(model, x2.state_dict(), partial_upsampler=True)
    skipped = {k for k, _ in report.skipped}
    assert skipped and all(k.startswith("tail.0.") for k in skipped)
    assert torch.equal(model.body[0].body[0].weight, x2.body[0].body[0].weight)
    assert torch.equal(model.tail[1].weight, x2.tail[1].weight)
    if target == 3:  # x3's upsampler conv has another shape: it keeps its initialization
        assert torch.equal(model.tail[0][0].weight, init_tail)
    else:  # x4's first stage has x2's shape and takes it; the second stage is skipped
        assert torch.equal(model.tail[0][0].weight, x2.tail[0][0].weight)
        assert skipped == {"tail.0.2.weight", "tail.0.2.bias"}
    assert "skipped" in str(report)


def test_mismatch_names_keys_and_the_files_architecture():
    with pytest.raises(CheckpointError) as err:
        load_weights(fastsr.edsr_baseline(2), official_state_dict(fastsr.EDSR(4, 32, 16)))
    msg = str(err.value)
    assert "looks like r32f16x4" in msg and "r16f64x2" in msg
    assert "unexpected keys: body.16.body.0.weight" in msg
    assert "mis-shaped: head.0.weight (file (16, 3, 3, 3), model (64, 3, 3, 3))" in msg


def test_missing_keys_are_named():
    sd = official_state_dict(fastsr.EDSR(2, 2, 8))
    del sd["body.1.body.2.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys: body\.1\.body\.2\.bias"):
        load_weights(fastsr.EDSR(2, 2, 8), sd)


@pytest.mark.parametrize("half", [False, True])
def test_safetensors_round_trip(tmp_path, half):
    model = fastsr.MDSR((2, 4), 2, 8)
    path = save_safetensors(model, tmp_path / "m.safetensors", half=half)
    sd, meta = read_checkpoint(path)
    assert meta["arch"] == "mdsr" and meta["scales"] == "[2, 4]"
    loaded = model_from_checkpoint(path)
    assert loaded.scales == (2, 4)
    for k, v in model.state_dict().items():
        expect = v.half().float() if half else v
        assert torch.equal(loaded.state_dict()[k], expect), k
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temp file


def test_safetensors_metadata_states_the_architecture(tmp_path):
    from safetensors.torch import save_file

    model = fastsr.MDSR((2, 4), 2, 8)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    base = {"format": "fastsr", "arch": "mdsr", "n_resblocks": "2", "n_feats": "8", "rgb_range": "255.0"}
    save_file(sd, tmp_path / "swapped.safetensors", metadata={**base, "scales": "[4, 2]"})
    with pytest.raises(CheckpointError, match=r"the metadata says mdsr r2f8 \(scales 4,2\), the tensors hold "
                                              r"mdsr r2f8 \(scales 2,4\)"):
        model_from_checkpoint(tmp_path / "swapped.safetensors")
    save_file(sd, tmp_path / "bad.safetensors", metadata={**base, "scales": "x4"})
    with pytest.raises(CheckpointError, match="its sizes are unreadable"):
        model_from_checkpoint(tmp_path / "bad.safetensors")
    save_file(sd, tmp_path / "other.safetensors", metadata={**base, "arch": "rcan", "scales": "[2, 4]"})
    with pytest.raises(CheckpointError, match="metadata arch='rcan'"):
        model_from_checkpoint(tmp_path / "other.safetensors")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_malicious_pickle_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        torch.save({"head.0.weight": torch.zeros(1), "x": Evil()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(path)
    assert "pwned" not in capsys.readouterr().out


@pytest.mark.parametrize("content,match", [(b"", "not a readable"), (b"garbage" * 10, "not a readable")])
def test_corrupt_files_are_clear_errors(tmp_path, content, match):
    for suffix in (".pt", ".safetensors"):
        path = tmp_path / f"bad{suffix}"
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=match):
            read_checkpoint(path)


def test_other_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint extension"):
        read_checkpoint(tmp_path / "w.bin")
    torch.save({"a": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not look like an EDSR"):
        model_from_checkpoint(tmp_path / "other.pt")
    assert describe({"head.0.weight": torch.zeros(4, 3, 3, 3)}) == "looks like r0f4x?"


def super_image_forward(model: fastsr.EDSR, x: torch.Tensor) -> torch.Tensor:
    """super-image's EDSR forward on x in 0..1, written out from its modules: no mean shift."""
    h = model.head(x)
    return model.tail(model.body(h) + h)


def test_super_image_weights_load_by_layout_and_run_as_super_image(tmp_path):
    torch.manual_seed(5)
    theirs = fastsr.EDSR(2, 2, 8)  # its keys are the official ones; its mean shift is never applied
    sd = official_state_dict(theirs, seed=5)
    for key in ("sub_mean.weight", "sub_mean.bias", "add_mean.weight", "add_mean.bias"):
        sd[key] = theirs.state_dict()[key]
    theirs.load_state_dict(sd)
    path = tmp_path / "pytorch_model_2x.pt"
    torch.save(sd, path)
    x = torch.rand(1, 3, 7, 6)
    with torch.no_grad():
        want = super_image_forward(theirs, x)
        model = model_from_checkpoint(path, layout="super-image")
        assert model.rgb_range == 1.0
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
        auto = model_from_checkpoint(path)  # the keys alone read as official: a different network
        assert (auto(x * 255) / 255 - want).abs().max() > 0.1
        into = fastsr.EDSR(2, 2, 8, rgb_range=1.0)
        load_weights(into, path, layout="super-image")
        torch.testing.assert_close(into(x), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(CheckpointError, match="super-image weights take 0..1 input: build the model with rgb_range=1"):
        load_weights(fastsr.EDSR(2, 2, 8), path, layout="super-image")
    with pytest.raises(ValueError, match="layout must be one of auto, official, basicsr, super-image"):
        model_from_checkpoint(path, layout="superimage")


def test_a_guessed_res_scale_is_said(tmp_path):
    path = tmp_path / "edsr_x2.pt"
    torch.save(official_state_dict(fastsr.EDSR(2, 1, 8)), path)
    with pytest.warns(UserWarning, match="does not store res_scale; using 1, the paper's for 8 features"):
        model_from_checkpoint(path)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model_from_checkpoint(path, res_scale=0.5).res_scale == 0.5  # given: no guess, no warning
