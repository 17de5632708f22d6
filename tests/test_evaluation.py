"""fastsr.evaluation: the three protocols on hand-made images, and the pieces they share."""
from __future__ import annotations

import math

import pytest
import torch

from fastsr.errors import FastSRError
from fastsr.evaluation import PROTOCOLS, evaluate_image, get_protocol, make_lr, prepare_hr, score, summarize
from fastsr.imresize import imresize
from fastsr.metrics import psnr_y, rgb_to_y, ssim_y


def _pair(h=37, w=29, seed=0):
    """An odd-sized uint8 HR (3, H, W) and a noisy float 'SR' of the same size."""
    gen = torch.Generator().manual_seed(seed)
    hr = torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8)
    sr = (hr.double() + torch.randn(3, h, w, generator=gen, dtype=torch.float64) * 6).clamp(0, 255).round()
    return sr, hr


def test_paper_and_official_agree_on_colour_images_div2k_scores_rgb_with_more_shave():
    sr, hr = _pair()
    p_paper, s_paper = score(sr, hr, 3, PROTOCOLS["paper"])
    p_off, s_off = score(sr, hr, 3, PROTOCOLS["official"])
    assert (p_paper, s_paper) == (p_off, s_off)
    assert p_paper == pytest.approx(float(psnr_y(sr, hr, shave=3)))
    p_rgb, s_rgb = score(sr, hr, 3, PROTOCOLS["div2k"])
    crop = (slice(None), slice(9, 37 - 9), slice(9, 29 - 9))  # shave = 3 + 6
    mse = (sr[crop] - hr[crop].double()).pow(2).mean()
    assert p_rgb == pytest.approx(10 * math.log10(255**2 / float(mse)), abs=1e-9)
    per_channel = [float(ssim_y(sr[c:c + 1], hr[c:c + 1], shave=9)) for c in range(3)]
    assert s_rgb == pytest.approx(sum(per_channel) / 3, abs=1e-12)


def test_a_gray_image_is_scored_on_its_own_channel_under_paper_only():
    """A one-channel file comes in as R = G = B. `paper` scores its gray values; `official`
    takes Y of the RGB copy, which compresses the range by 219/255: +1.32 dB exactly."""
    sr1, hr1 = _pair(40, 33, seed=3)
    sr, hr = sr1[:1].expand(3, -1, -1), hr1[:1].expand(3, -1, -1)
    p_paper, _ = score(sr, hr, 2, PROTOCOLS["paper"], gray=True)
    p_official, _ = score(sr, hr, 2, PROTOCOLS["official"], gray=True)
    own = float(psnr_y(sr1[:1], hr1[:1], shave=2))
    assert p_paper == pytest.approx(own, abs=1e-9)
    assert p_official - p_paper == pytest.approx(20 * math.log10(255 / 219), abs=1e-9)
    # An RGB file that happens to be gray (R = G = B) is a colour image: Y, as official.
    assert score(sr, hr, 2, PROTOCOLS["paper"], gray=False)[0] == pytest.approx(p_official)
    # Y of gray is 16 + 219/255 * gray, not gray (what an old test comment claimed).
    assert float(rgb_to_y(hr.double())[0, 0, 0]) == pytest.approx(16 + 219 / 255 * float(hr[0, 0, 0]))


def test_prepare_hr_modcrops_and_names_images_too_small():
    sr, hr = _pair(37, 29)
    out = prepare_hr(hr.float(), 3, PROTOCOLS["paper"])
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 36, 27) and torch.equal(out, hr[:, :36, :27])
    with pytest.raises(FastSRError, match=r"tiny.png: 1x1 is too small for x2 under the paper protocol"):
        prepare_hr(torch.zeros(3, 1, 1), 2, PROTOCOLS["paper"], "tiny.png")
    # div2k shaves s + 6: the same 29-px width that passes paper at x4 is too narrow there.
    prepare_hr(hr, 4, PROTOCOLS["paper"])
    with pytest.raises(FastSRError, match=r"at least 31x31"):
        prepare_hr(hr, 4, PROTOCOLS["div2k"])


def test_make_lr_is_matlab_bicubic_to_exactly_a_sth_of_the_cropped_hr():
    _, hr = _pair(37, 29)
    lr = make_lr(hr, 3)  # crops to 36x27 first
    assert lr.dtype == torch.uint8 and tuple(lr.shape) == (3, 12, 9)
    assert torch.equal(lr, imresize(hr[:, :36, :27].contiguous(), size=(12, 9)))


def test_evaluate_image_and_summarize_handle_an_exact_result():
    flat = torch.full((3, 24, 26), 90.0)  # bicubic of a constant image is exact: PSNR inf
    up = lambda lr: imresize(lr, scale=2).float()
    r = evaluate_image(up, flat, 2, "paper", name="flat.png")
    assert (r.width, r.height) == (26, 24) and math.isinf(r.psnr) and r.ssim == pytest.approx(1.0)
    _, hr = _pair(24, 26)
    r2 = evaluate_image(up, hr, 2, "paper", name="noise.png")
    s = summarize("set", 2, [r, r2])
    assert s.infinite == ["flat.png"] and s.psnr == r2.psnr and s.ssim == pytest.approx((1 + r2.ssim) / 2)
    assert s.as_dict()["images"][0]["psnr"] == "inf"
    with pytest.raises(FastSRError, match="returned"):
        evaluate_image(lambda lr: lr.float(), hr, 2, "paper")


def test_protocol_names():
    assert get_protocol("paper").shave(4) == 4 and get_protocol("div2k").shave(4) == 10
    with pytest.raises(ValueError, match="paper, official, div2k"):
        get_protocol("matlab")
