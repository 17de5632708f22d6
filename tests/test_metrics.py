"""Y-channel PSNR/SSIM of the SR evaluation protocol, and quantize."""
import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from fastsr.metrics import psnr_y, quantize, rgb_to_y, ssim_y


def test_rgb_to_y_white_and_black():
    white = torch.full((3, 4, 4), 255, dtype=torch.uint8)
    black = torch.zeros(2, 3, 4, 4)
    assert torch.allclose(rgb_to_y(white), torch.tensor(235.0, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(rgb_to_y(black), torch.tensor(16.0), atol=1e-6)
    assert rgb_to_y(white).shape == (1, 4, 4)
    assert rgb_to_y(black).shape == (2, 1, 4, 4)
    gray = torch.rand(2, 1, 4, 4) * 255
    assert torch.equal(rgb_to_y(gray), gray)


def test_psnr_hand_computed():
    hr = torch.randint(0, 255, (2, 3, 20, 20), dtype=torch.uint8)
    sr = hr + 1
    # +1 on every channel moves Y by (65.481 + 128.553 + 24.966) / 255 = 219 / 255 levels,
    # so MSE = (219 / 255)^2 and PSNR = 20 log10(255 / (219 / 255)).
    expected = 20 * math.log10(255 * 255 / 219)
    out = psnr_y(sr, hr, shave=2)
    assert out.shape == (2,) and out.dtype == torch.float64
    assert torch.allclose(out, torch.tensor(expected, dtype=torch.float64), atol=1e-9)

    # Gray images: Y is the image itself, 1 level off -> MSE 1 -> 20 log10(255).
    gray = torch.rand(16, 16, dtype=torch.float64) * 200
    single = psnr_y(gray + 1, gray, shave=0)
    assert single.dim() == 0
    assert math.isclose(single.item(), 20 * math.log10(255), abs_tol=1e-9)


def test_psnr_identical_is_inf():
    img = torch.rand(3, 10, 10) * 255
    assert math.isinf(psnr_y(img, img.clone(), shave=1).item())


def test_shave_drops_the_border():
    hr = torch.rand(1, 3, 20, 20, dtype=torch.float64) * 255
    sr = hr.clone()
    sr[..., :3, :] += 50  # damage only the top 3 rows
    sr[..., :, -3:] -= 50  # and the right 3 columns
    assert math.isinf(psnr_y(sr, hr, shave=3).item())
    assert math.isfinite(psnr_y(sr, hr, shave=2).item())
    # Shaving is the same as cropping by hand.
    s = 2
    cropped = psnr_y(sr[..., s:-s, s:-s], hr[..., s:-s, s:-s], shave=0)
    assert torch.allclose(psnr_y(sr, hr, shave=s), cropped)


def test_ssim_identical_is_one(device):
    img = torch.randint(0, 256, (2, 3, 32, 30), dtype=torch.uint8, device=device)
    out = ssim_y(img, img.clone(), shave=3)
    assert out.shape == (2,) and out.dtype == torch.float64
    assert torch.allclose(out.cpu(), torch.ones(2, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("shave", [0, 4])
def test_ssim_matches_skimage(shave):
    rng = np.random.default_rng(0)
    hr = rng.uniform(0, 255, size=(48, 41))
    sr = np.clip(hr + rng.normal(0, 20, size=hr.shape), 0, 255)
    ours = ssim_y(torch.from_numpy(sr), torch.from_numpy(hr), shave=shave).item()

    # skimage with gaussian_weights=True filters the *full* image (scipy, truncate 3.5 ->
    # radius int(3.5 * 1.5 + 0.5) = 5, i.e. the same normalized 11x11 Gaussian as
    # fspecial('gaussian', 11, 1.5)), then averages the map after cropping
    # (win_size - 1) // 2 = 5 pixels from every border. The pixels left are exactly those
    # whose 11x11 window lies inside the image, so the reflect padding never contributes
    # and its mean equals MATLAB's 'valid' map mean: the two agree to rounding error.
    s = slice(shave, -shave) if shave else slice(None)
    ref = structural_similarity(
        sr[s, s],
        hr[s, s],
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
    )
    assert abs(ours - ref) < 1e-10, (ours, ref)


def test_ssim_rgb_is_ssim_of_y():
    rgb_hr = torch.rand(3, 24, 24, dtype=torch.float64) * 255
    rgb_sr = (rgb_hr + torch.randn_like(rgb_hr) * 10).clamp(0, 255)
    direct = ssim_y(rgb_sr, rgb_hr, shave=2)
    via_y = ssim_y(rgb_to_y(rgb_sr), rgb_to_y(rgb_hr), shave=2)
    assert direct.dim() == 0
    assert torch.allclose(direct, via_y, atol=1e-14)


def test_bad_arguments():
    a = torch.rand(3, 20, 20)
    with pytest.raises(ValueError, match="same shape"):
        psnr_y(a, torch.rand(3, 20, 21), shave=0)
    with pytest.raises(ValueError, match="shave must be a non-negative int"):
        psnr_y(a, a, shave=-1)
    with pytest.raises(ValueError, match="leaves nothing"):
        psnr_y(a, a, shave=10)
    with pytest.raises(ValueError, match="smaller than the 11x11"):
        ssim_y(a, a, shave=5)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        psnr_y(torch.rand(2, 20, 20), torch.rand(2, 20, 20), shave=0)


def test_quantize():
    x = torch.tensor([-3.0, 0.4, 127.5, 128.5, 254.6, 300.0])
    # torch.round is half-to-even, like the official code: 127.5 -> 128, 128.5 -> 128.
    assert torch.equal(quantize(x), torch.tensor([0.0, 0.0, 128.0, 128.0, 255.0, 255.0]))
    y = torch.tensor([0.0, 0.5, 1.2])
    assert torch.allclose(quantize(y, rgb_range=1), torch.tensor([0.0, 128 / 255, 1.0]))
