"""fastsr.inference: tiling is exact at the default overlap, self-ensemble, auto tiles, bicubic,
streamed output rows and the memory estimate behind --max-memory."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastsr import inference
from fastsr.imresize import imresize
from fastsr.inference import auto_tile_size, bicubic_upscale, receptive_field_radius, upscale
from fastsr.models import EDSR, MDSR, PRESETS


def _tiny(model: nn.Module, seed: int = 0) -> nn.Module:
    # Default init makes the tiny nets close to constant; larger weights make seams visible.
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    return model.eval()


class NearestUp(nn.Module):
    """Nearest-neighbour upsampling: commutes with flips and 90-degree rotations."""

    def forward(self, x, scale=None):
        return F.interpolate(x, scale_factor=scale, mode="nearest")


@pytest.mark.parametrize(
    "make,scale,size,tile",
    [
        (lambda: EDSR(2, n_resblocks=2, n_feats=8), 2, (37, 29), 10),
        (lambda: EDSR(3, n_resblocks=2, n_feats=8), 3, (23, 31), 7),
        (lambda: EDSR(4, n_resblocks=2, n_feats=8), 4, (19, 26), 9),
        (lambda: MDSR((2, 3, 4), n_resblocks=2, n_feats=8), 3, (29, 21), 11),
        (lambda: MDSR((2, 3, 4), n_resblocks=2, n_feats=8), 4, (17, 33), 16),
    ],
    ids=["edsr-x2", "edsr-x3", "edsr-x4", "mdsr-x3", "mdsr-x4"],
)
def test_tiled_equals_untiled_at_default_overlap(make, scale, size, tile):
    model = _tiny(make())
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1)) * 255
    full = upscale(model, x, scale)
    assert full.shape == (2, 3, size[0] * scale, size[1] * scale)
    tiled = upscale(model, x, scale, tile=tile)
    assert (tiled - full).abs().max().item() <= 1e-4


def test_smaller_overlap_is_not_exact():
    # The receptive-field radius is tight: one pixel less of context shows at the seams.
    model = _tiny(EDSR(2, n_resblocks=2, n_feats=8))
    x = torch.rand(1, 3, 30, 30, generator=torch.Generator().manual_seed(2)) * 255
    radius = receptive_field_radius(model, 2)
    full = upscale(model, x, 2)
    assert (upscale(model, x, 2, tile=8, tile_overlap=radius) - full).abs().max() <= 1e-4
    assert (upscale(model, x, 2, tile=8, tile_overlap=radius - 1) - full).abs().max() > 1e-3


def test_receptive_field_radius_of_presets():
    with torch.device("meta"):
        # head 1 + 16 blocks * 2 + body conv 1 + upsampler conv(s) + tail conv, in LR pixels.
        assert receptive_field_radius(PRESETS["edsr_baseline"](2), 2) == 1 + 32 + 1 + 1 + 1
        assert receptive_field_radius(PRESETS["edsr_baseline"](4), 4) == 1 + 32 + 1 + 2 + 1
        # MDSR adds its two 5x5 pre-processing blocks (4 convs * 2) for the active scale only.
        assert receptive_field_radius(PRESETS["mdsr_baseline"](), 3) == 1 + 8 + 32 + 1 + 1 + 1
        assert receptive_field_radius(PRESETS["mdsr_baseline"]()) == 1 + 8 + 32 + 1 + 2 + 1
    assert receptive_field_radius(NearestUp()) == 0


def test_self_ensemble_of_equivariant_model_is_identity():
    x = torch.rand(2, 3, 7, 10) * 255
    plain = upscale(NearestUp(), x, 3)
    assert torch.allclose(upscale(NearestUp(), x, 3, self_ensemble=True), plain, atol=1e-4)


def test_self_ensemble_is_the_mean_of_the_eight_transforms():
    model = _tiny(EDSR(2, n_resblocks=1, n_feats=8))
    x = torch.rand(1, 3, 9, 13) * 255
    outs = []
    with torch.no_grad():
        for flip in (False, True):
            xf = x.flip(-1) if flip else x
            for k in range(4):
                y = torch.rot90(model(torch.rot90(xf, k, (-2, -1))), -k, (-2, -1))
                outs.append(y.flip(-1) if flip else y)
    expected = torch.stack(outs).mean(0)
    got = upscale(model, x, 2, self_ensemble=True)
    assert (got - expected).abs().max() <= 1e-3
    # Tiling composes with the ensemble (the rotated inputs are tiled too).
    assert (upscale(model, x, 2, self_ensemble=True, tile=5) - got).abs().max() <= 1e-4


def test_upscale_keeps_dtype_and_runs_in_inference_mode():
    model = _tiny(EDSR(2, n_resblocks=1, n_feats=8)).to(torch.bfloat16)
    y = upscale(model, (torch.rand(1, 3, 6, 5) * 255).to(torch.bfloat16), 2, self_ensemble=True)
    assert y.dtype == torch.bfloat16 and y.shape == (1, 3, 12, 10) and y.is_inference()


def test_upscale_argument_checks():
    model = NearestUp()
    x = torch.rand(1, 3, 4, 4)
    with pytest.raises(ValueError, match="tile"):
        upscale(model, x, 2, tile=0)
    with pytest.raises(ValueError, match="tile_overlap"):
        upscale(model, x, 2, tile=2, tile_overlap=-1)
    with pytest.raises(ValueError, match="float"):
        upscale(model, x.to(torch.uint8), 2)


def test_auto_tile_size(monkeypatch):
    model = EDSR(2, n_resblocks=2, n_feats=8)
    # Plenty of memory: the whole image fits, no tiling.
    monkeypatch.setattr(inference, "free_memory_bytes", lambda device: 64 << 30)
    assert auto_tile_size(model, "cpu", torch.float32, lr_size=(100, 100), scale=2) is None
    # 64 MiB free: ~ 8 feats * 4 bytes * 16 = 512 bytes per LR pixel -> tiles of a few hundred.
    monkeypatch.setattr(inference, "free_memory_bytes", lambda device: 64 << 20)
    tile = auto_tile_size(model, "cpu", torch.float32, lr_size=(2000, 2000), scale=2)
    assert tile is not None and 32 <= tile < 2000 and tile % 8 == 0
    # Unknown free memory: a fixed, conservative tile for large inputs.
    monkeypatch.setattr(inference, "free_memory_bytes", lambda device: None)
    assert auto_tile_size(model, "cpu", torch.float32, lr_size=(2000, 2000), scale=2) == 512
    # tile="auto" through upscale: tiled, and still exact.
    monkeypatch.setattr(inference, "free_memory_bytes", lambda device: 2 << 20)
    x = torch.rand(1, 3, 70, 50) * 255
    _tiny(model)
    assert auto_tile_size(model, "cpu", torch.float32, lr_size=(70, 50), scale=2) == 32
    assert (upscale(model, x, 2, tile="auto") - upscale(model, x, 2)).abs().max() <= 1e-4


def test_free_memory_reads_something_on_cpu():
    free = inference.free_memory_bytes("cpu")
    assert free is None or free > 0


def test_bicubic_upscale_matches_imresize():
    x8 = torch.randint(0, 256, (1, 3, 5, 7), dtype=torch.uint8)
    y8 = bicubic_upscale(x8, 3)
    assert y8.dtype == torch.uint8 and y8.shape == (1, 3, 15, 21)
    assert torch.equal(y8, imresize(x8, scale=3))
    yf = bicubic_upscale(x8.float(), 2)
    assert yf.dtype == torch.float32 and torch.equal(yf, imresize(x8.float(), scale=2))


def test_upscale_rows_streams_the_quantized_output():
    import numpy as np

    from fastsr.inference import upscale_rows

    model = _tiny(EDSR(3, n_resblocks=2, n_feats=8))
    image = torch.randint(0, 256, (41, 30, 3), dtype=torch.uint8).numpy()
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None]
    expected = upscale(model, x, 3)[0].clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    overlap = receptive_field_radius(model, 3)
    calls = []

    def process(crop):
        calls.append(crop.shape)
        return upscale(model, torch.from_numpy(crop).permute(2, 0, 1).float()[None], 3)[0]

    bands = list(upscale_rows(process, image, 3, 16, overlap))
    assert [b.shape for b in bands] == [(42, 90, 3), (39, 90, 3), (42, 90, 3)]  # 41 rows: 14 + 13 + 14
    assert len(calls) == 6 and all(b.dtype == np.uint8 for b in bands)
    got = np.concatenate(bands)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    whole = list(upscale_rows(process, image, 3, None, overlap))
    assert len(whole) == 1 and np.array_equal(whole[0], expected)
    sixteen = next(upscale_rows(lambda c: torch.full((3, 3 * c.shape[0], 3 * c.shape[1]), 255.0), image, 3, None, 0, 16))
    assert sixteen.dtype == np.uint16 and (sixteen == 65535).all()


def test_memory_estimate_and_tile_choice():
    from fastsr.inference import tile_for_memory, upscale_peak_bytes

    model = EDSR(2, n_resblocks=2, n_feats=8)
    peaks = [upscale_peak_bytes(model, (3000, 2000), 3, 8, 2, t, 6) for t in (32, 64, 256, 1024, None)]
    assert peaks == sorted(peaks)
    # Decoding (16 B/px for 8-bit files, 32 for 16-bit) is a floor no tile size goes under.
    assert min(peaks) >= 3000 * 2000 * 16
    assert upscale_peak_bytes(model, (6000, 6000), 3, 8, 2, 32, 6) == 6000 * 6000 * 16
    assert upscale_peak_bytes(model, (6000, 6000), 4, 16, 2, 32, 6) == 6000 * 6000 * 32

    def peak(tile):
        return 100 + (10**6 if tile is None else tile * tile)

    assert tile_for_memory(10**6 + 100, peak, (2000, 1000)) is None
    assert tile_for_memory(200 * 200 + 100, peak, (2000, 1000)) == 200
    assert tile_for_memory(203 * 203 + 100, peak, (2000, 1000)) == 200  # multiples of 8
    assert tile_for_memory(10, peak, (2000, 1000)) == 32  # nothing fits: the smallest, caller refuses


@pytest.mark.parametrize("tile", [None, 5])
def test_upscale_feeds_a_0_to_1_model_its_own_range(tile):
    """upscale takes 0..255; a model trained with rgb_range=1 (official --rgb_range 1) gets
    x / 255 and its output comes back times 255, tiled or not."""
    torch.manual_seed(0)
    model = EDSR(2, 1, 8, rgb_range=1.0).eval()
    x = torch.rand(1, 3, 11, 9) * 255
    with torch.no_grad():
        want = model(x / 255, scale=2) * 255
    torch.testing.assert_close(upscale(model, x, 2, tile=tile), want, rtol=1e-5, atol=1e-3)
