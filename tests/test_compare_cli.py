"""`fastsr compare`: the real command writes its picture, with scores that are the protocol's."""
import re

import numpy as np
import pytest
from PIL import Image as PILImage

from fastsr import cli
from fastsr.checkpoints import model_from_checkpoint
from fastsr.cli.compare import _GAP, label_layout
from fastsr.evaluation import get_protocol, make_lr, prepare_hr, score
from fastsr.imageio import read_image
from fastsr.inference import bicubic_upscale, upscale
from fastsr.metrics import quantize

def _photo(h, w):
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 100 * np.sin(x / 3.0), 128 + 100 * np.cos(y / 4.0), (x * y) % 256], -1)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_compare_writes_bicubic_fastsr_and_ground_truth(tmp_path, weights_x2, capsys):
    src = tmp_path / "hr.png"
    PILImage.fromarray(_photo(41, 49)).save(src)  # cropped to 40x48 for x2
    out = tmp_path / "cmp.png"
    assert cli.main(["compare", str(src), "-s", "2", "-w", str(weights_x2), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    picture = np.asarray(PILImage.open(out).convert("RGB"))
    size, zoom = 10, 48 // 10  # a quarter of the short side; zoomed to the panel's width

    # The scores printed (and in the labels) are the paper protocol's on the same images.
    protocol = get_protocol("paper")
    hr = prepare_hr(read_image(src).rgb, 2, protocol)
    lr = make_lr(hr, 2)
    model = model_from_checkpoint(weights_x2).eval()
    sr = quantize(upscale(model, lr[None].float(), 2))[0]
    bic = bicubic_upscale(lr[None], 2)[0].float()
    (pb, sb), (pf, sf) = score(bic, hr, 2, protocol), score(sr, hr, 2, protocol)
    assert f"bicubic {pb:.2f} dB / {sb:.4f}, fastsr {pf:.2f} dB / {sf:.4f}" in err
    lay = label_layout([f"bicubic  {pb:.2f} dB / {sb:.4f}", f"fastsr  {pf:.2f} dB / {sf:.4f}", "ground truth (HR)"],
                       48, zoom)
    assert lay.lines[0] == ["bicubic", f"{pb:.2f} dB / {sb:.4f}"] and lay.font_px < 14  # 48-px panels: smaller text
    LABEL_H, CROP_H = lay.label_h, lay.crop_h
    assert picture.shape == (LABEL_H + 40 + _GAP + CROP_H + size * zoom, 3 * 48 + 2 * _GAP, 3)

    # The third panel's zoomed crop is the ground truth's pixels, nearest-neighbour zoomed.
    x, y = (int(v) for v in re.search(r"crop 10x10 at (\d+),(\d+)", err).groups())
    top, left = LABEL_H + 40 + _GAP + CROP_H, 2 * (48 + _GAP)
    shown = picture[top:top + size * zoom, left:left + size * zoom]
    crop = hr[:, y:y + size, x:x + size].permute(1, 2, 0).numpy()
    assert np.array_equal(shown, crop.repeat(zoom, 0).repeat(zoom, 1))
    # The first panel's full view is the bicubic image (outside the red crop outline).
    view = picture[LABEL_H:LABEL_H + 40, :48].astype(np.int16)
    outside = np.ones((40, 48), bool)
    outside[max(0, y - 2):y + size + 2, max(0, x - 2):x + size + 2] = False
    expected = bic.round().permute(1, 2, 0).numpy().astype(np.int16)
    assert np.abs(view - expected)[outside].max() == 0


def test_compare_of_an_lr_input_has_no_ground_truth(tmp_path, capsys):
    src = tmp_path / "lr.png"
    PILImage.fromarray(_photo(20, 24)).save(src)
    out = tmp_path / "cmp.png"
    assert cli.main(["compare", str(src), "-s", "3", "--bicubic", "--lr", "-o", str(out), "--crop", "0,0,12"]) == 0
    assert "PSNR" not in capsys.readouterr().err
    picture = np.asarray(PILImage.open(out).convert("RGB"))
    lay = label_layout(["bicubic", "bicubic"], 72, 72 // 12)
    assert picture.shape == (lay.label_h + 60 + _GAP + lay.crop_h + 12 * (72 // 12), 2 * 72 + _GAP, 3)


@pytest.mark.parametrize("extra, needle", [
    (["-o", "cmp.jpg"], "expected a .png file name"),
    (["-o", "cmp.png", "--crop", "40,0,16"], "--crop 40,0,16: outside the 48x40 output"),
])
def test_compare_errors_are_one_line(tmp_path, capsys, extra, needle):
    src = tmp_path / "hr.png"
    PILImage.fromarray(_photo(40, 48)).save(src)
    extra = [str(tmp_path / e) if e.startswith("cmp") else e for e in extra]
    assert cli.main(["compare", str(src), "-s", "2", "--bicubic", *extra]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastsr: error:")]
    assert len(errors) == 1 and needle in errors[0]
    assert not any(p.suffix in (".png", ".jpg") and p.name.startswith("cmp") for p in tmp_path.iterdir())


def test_compare_bad_crop_is_a_usage_error(tmp_path):
    assert cli.main(["compare", "x.png", "-s", "2", "-o", str(tmp_path / "c.png"), "--crop", "1,2"]) == 2
