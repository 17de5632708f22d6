"""The `fastsr` command line, mostly in-process through fastsr.cli.main([...])."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

import fastsr.weights
from testenv import shared_set, tiny_random
from fastsr import cli
from fastsr.checkpoints import save_safetensors
from fastsr.cli.common import parse_size
from fastsr.imageio import encode_png16, read_image
from fastsr.inference import Upscaler
from fastsr.models import EDSR, MDSR

RNG = np.random.default_rng(7)


@pytest.fixture
def no_shipped_weights(monkeypatch):
    monkeypatch.setattr(fastsr.weights, "default_weights", lambda scale: None)


def _photo(h, w):
    """Smooth content (bicubic/SR numbers on noise mean little)."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 100 * np.sin(x / 5.0), 128 + 100 * np.cos(y / 7.0), (x + y) % 256], -1)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture
def inputs(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    PILImage.fromarray(_photo(12, 15)).save(d / "good.png")
    PILImage.fromarray(_photo(9, 8)[..., 0]).save(d / "gray.jpg")
    rgba = np.concatenate([_photo(10, 11), RNG.integers(0, 256, (10, 11, 1), dtype=np.uint8)], -1)
    PILImage.fromarray(rgba).save(d / "alpha.png")
    (d / "deep.png").write_bytes(encode_png16(RNG.integers(0, 65536, (6, 7, 3), dtype=np.uint16)))
    (d / "broken.png").write_text("not a png at all\n")
    (d / "empty.png").write_bytes(b"")
    (d / "notes.txt").write_text("ignored: not an image extension\n")
    return d


def _errors(stderr):
    return [line for line in stderr.splitlines() if line.startswith("fastsr: error:")]


def test_upscale_good_and_bad_files(tmp_path, inputs, weights_x2, capsys):
    out = tmp_path / "out"
    code = cli.main(["upscale", str(inputs), "-o", str(out), "--scale", "2", "--weights", str(weights_x2)])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    errors = _errors(err)
    assert len(errors) == 2
    assert any("broken.png" in e for e in errors) and any("empty.png" in e for e in errors)
    written = sorted(p.name for p in out.iterdir())
    assert written == ["alpha_x2.png", "deep_x2.png", "good_x2.png", "gray_x2.png"]
    good = read_image(out / "good_x2.png")
    assert good.rgb.shape == (3, 24, 30) and good.alpha is None and good.bit_depth == 8
    alpha = read_image(out / "alpha_x2.png")
    assert alpha.alpha is not None and alpha.rgb.shape == (3, 20, 22)
    deep = read_image(out / "deep_x2.png")
    assert deep.bit_depth == 16 and deep.rgb.shape == (3, 12, 14)


def test_upscale_all_good_exit_zero_and_matches_library(tmp_path, weights_x2, capsys):
    from fastsr.checkpoints import model_from_checkpoint
    from fastsr.inference import upscale

    src = tmp_path / "a.png"
    PILImage.fromarray(_photo(11, 13)).save(src)
    out = tmp_path / "out"
    args = ["upscale", str(src), "-o", str(out), "-s", "2", "-w", str(weights_x2), "--tile", "4", "--self-ensemble"]
    assert cli.main(args) == 0
    assert _errors(capsys.readouterr().err) == []
    model = model_from_checkpoint(weights_x2).eval()
    expected = upscale(model, read_image(src).rgb[None], 2, self_ensemble=True)[0]
    got = read_image(out / "a_x2.png").rgb
    assert (got - expected.clamp(0, 255).round()).abs().max() <= 1


def test_a_tiled_image_gets_a_progress_bar_over_its_tiles(tmp_path, weights_x2, monkeypatch):
    import tqdm

    bars = []

    class Recording(tqdm.tqdm):
        def __init__(self, *a, **kw):
            bars.append(kw)
            super().__init__(*a, **kw)

    monkeypatch.setattr(tqdm, "tqdm", Recording)
    src = tmp_path / "a.png"
    PILImage.fromarray(_photo(11, 13)).save(src)
    assert cli.main(["upscale", str(src), "-o", str(tmp_path / "o"), "-s", "2", "-w", str(weights_x2),
                     "--tile", "4"]) == 0
    tile_bars = [kw for kw in bars if kw.get("unit") == "tile"]
    assert tile_bars == [dict(total=3 * 4, desc="a.png", unit="tile", leave=False, disable=None, file=sys.stderr)]


def test_upscale_without_weights_is_loud_bicubic(tmp_path, no_shipped_weights, capsys):
    src = tmp_path / "a.png"
    PILImage.fromarray(_photo(8, 8)).save(src)
    assert cli.main(["upscale", str(src), "-o", str(tmp_path / "o"), "--scale", "3"]) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "bicubic" in err and "NOT EDSR" in err
    assert read_image(tmp_path / "o" / "a_x3.png").rgb.shape == (3, 24, 24)


def test_explicit_bicubic_is_quiet(tmp_path, capsys):
    src = tmp_path / "a.png"
    PILImage.fromarray(_photo(8, 8)).save(src)
    assert cli.main(["upscale", str(src), "-o", str(tmp_path / "o"), "--scale", "2", "--bicubic"]) == 0
    assert "WARNING" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--scale", "3"], "x2 model"),
        (["--scale", "2", "--model", "edsr"], "not --model edsr"),
        (["--scale", "2", "--device", "cuda"], "CUDA is not available"),
    ],
    ids=["wrong-scale", "wrong-preset", "no-cuda"],
)
def test_model_selection_errors_are_one_line(tmp_path, weights_x2, capsys, extra, needle):
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    src = tmp_path / "a.png"
    PILImage.fromarray(_photo(8, 8)).save(src)
    code = cli.main(["upscale", str(src), "-o", str(tmp_path / "o"), "-w", str(weights_x2), *extra])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    errors = _errors(err)
    assert len(errors) == 1 and needle in errors[0]


def test_bad_checkpoint_is_one_line(tmp_path, capsys):
    src = tmp_path / "a.png"
    PILImage.fromarray(_photo(8, 8)).save(src)
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"garbage")
    assert cli.main(["upscale", str(src), "-o", str(tmp_path / "o"), "-s", "2", "-w", str(bad)]) == 1
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and "junk.safetensors" in errors[0]


def test_mdsr_weights_pass_the_scale(tmp_path, capsys):
    weights = save_safetensors(tiny_random(MDSR((2, 3), n_resblocks=1, n_feats=8)), tmp_path / "mdsr.safetensors")
    src = tmp_path / "a.png"
    PILImage.fromarray(_photo(7, 9)).save(src)
    assert cli.main(["upscale", str(src), "-o", str(tmp_path / "o"), "-s", "3", "-w", str(weights)]) == 0
    assert read_image(tmp_path / "o" / "a_x3.png").rgb.shape == (3, 21, 27)
    assert cli.main(["upscale", str(src), "-o", str(tmp_path / "o"), "-s", "4", "-w", str(weights)]) == 1
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and "scales (2, 3)" in errors[0]


def test_duplicate_stems_and_empty_folders(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    PILImage.fromarray(_photo(6, 6)).save(d / "a.png")
    PILImage.fromarray(_photo(6, 6)).save(d / "a.bmp")
    empty = tmp_path / "nothing"
    empty.mkdir()
    code = cli.main(["upscale", str(d), str(empty), "-o", str(tmp_path / "o"), "-s", "2", "--bicubic"])
    errors = _errors(capsys.readouterr().err)
    assert code == 1 and len(errors) == 2
    assert any("would overwrite" in e for e in errors) and any("nothing" in e for e in errors)
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["a_x2.png"]


def test_output_problems_are_one_line(tmp_path, capsys):
    src = tmp_path / "a.png"
    PILImage.fromarray(_photo(6, 6)).save(src)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    assert cli.main(["upscale", str(src), "-o", str(not_a_folder), "-s", "2", "--bicubic"]) == 1
    # A folder squatting on the output name: the write fails, reported, no traceback.
    (tmp_path / "o" / "a_x2.png").mkdir(parents=True)
    assert cli.main(["upscale", str(src), "-o", str(tmp_path / "o"), "-s", "2", "--bicubic"]) == 1
    err = capsys.readouterr().err
    errors = _errors(err)
    assert "Traceback" not in err and len(errors) == 2
    assert "not a folder" in errors[0] and "cannot write" in errors[1]
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["a_x2.png"]  # no temp file left


def test_usage_errors_exit_2(tmp_path, capsys):
    assert cli.main(["upscale", "x.png", "-o", str(tmp_path), "--scale", "2", "--tile", "0"]) == 2
    assert cli.main(["upscale", "x.png", "-o", str(tmp_path)]) == 1  # --scale missing: no weights file to give it
    assert "--scale is required without --weights" in capsys.readouterr().err
    assert cli.main(["upscale", "x.png", "-o", str(tmp_path), "-s", "5"]) == 2
    assert cli.main(["eval", str(tmp_path), "-s", "2", "--bicubic", "--weights", "w.pt"]) == 2
    assert cli.main([]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_keyboard_interrupt_exits_130(tmp_path, monkeypatch, capsys):
    src = tmp_path / "a.png"
    PILImage.fromarray(_photo(6, 6)).save(src)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("fastsr.imageio.read_pixels", interrupted)
    assert cli.main(["upscale", str(src), "-o", str(tmp_path / "o"), "-s", "2", "--bicubic"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


def test_bugs_keep_their_traceback(tmp_path, monkeypatch):
    src = tmp_path / "a.png"
    PILImage.fromarray(_photo(6, 6)).save(src)

    def buggy(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("fastsr.imageio.read_pixels", buggy)
    with pytest.raises(ZeroDivisionError):
        cli.main(["upscale", str(src), "-o", str(tmp_path / "o"), "-s", "2", "--bicubic"])


def test_python_m_fastsr_help():
    # The one subprocess test: the real entry point, in a fresh interpreter.
    proc = subprocess.run([sys.executable, "-m", "fastsr", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "upscale" in proc.stdout and "eval" in proc.stdout


def test_subcommand_help(capsys):
    assert cli.main(["upscale", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--weights", "--tile", "--tile-overlap", "--self-ensemble", "--half", "--max-pixels", "--bicubic"):
        assert flag in out


# ----------------------------------------------------------------------------- eval


def test_eval_bicubic_set5_x2_matches_published(capsys):
    data = shared_set("Set5")
    assert cli.main(["eval", str(data), "--scale", "2", "--bicubic", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["protocol"] == "paper" and len(result["results"]) == 1
    r = result["results"][0]
    assert r["dataset"] == "Set5" and r["scale"] == 2 and r["n_images"] == 5 and r["failed"] == []
    assert r["psnr"] == pytest.approx(33.66, abs=0.03)
    assert r["ssim"] == pytest.approx(0.9299, abs=0.002)


def test_eval_bicubic_set5_set14_all_scales_match_the_published_table(capsys):
    """The published bicubic table (Set5 33.66/30.39/28.42, Set14 30.24/27.55/26.00) within
    0.03 dB under `paper`: Set14's one-channel bridge.png scored on its own channel."""
    sets = [shared_set("Set5"), shared_set("Set14")]
    assert cli.main(["eval", *map(str, sets), "--scale", "2", "3", "4", "--bicubic", "--json"]) == 0
    got = {(r["dataset"], r["scale"]): r["psnr"] for r in json.loads(capsys.readouterr().out)["results"]}
    published = {("Set5", 2): 33.66, ("Set5", 3): 30.39, ("Set5", 4): 28.42,
                 ("Set14", 2): 30.24, ("Set14", 3): 27.55, ("Set14", 4): 26.00}
    for key, want in published.items():
        assert got[key] == pytest.approx(want, abs=0.03), key
    assert cli.main(["eval", str(sets[1]), "--scale", "2", "--bicubic", "--json", "--protocol", "official"]) == 0
    official = json.loads(capsys.readouterr().out)["results"][0]["psnr"]
    assert official - got[("Set14", 2)] == pytest.approx(20 * np.log10(255 / 219) / 14, abs=1e-3)


@pytest.fixture
def hr_set(tmp_path):
    d = tmp_path / "hr"
    d.mkdir()
    PILImage.fromarray(_photo(33, 41)).save(d / "one.png")
    PILImage.fromarray(_photo(30, 30)[..., 1]).save(d / "gray.png")
    return d


def test_eval_with_weights_json_and_table(hr_set, weights_x2, capsys):
    assert cli.main(["eval", str(hr_set), "-s", "2", "-w", str(weights_x2), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    r = result["results"][0]
    assert r["n_images"] == 2 and "r1f8x2" in result["weights"]
    assert [im["name"] for im in r["images"]] == ["gray.png", "one.png"]
    assert [(im["width"], im["height"]) for im in r["images"]] == [(30, 30), (40, 32)]  # after modcrop
    for row in r["images"]:
        assert np.isfinite(row["psnr"]) and 0 < row["ssim"] <= 1 and row["seconds"] >= 0
    # Both images by hand: the protocol through the library functions.
    from fastsr.checkpoints import model_from_checkpoint
    from fastsr.imresize import imresize, modcrop
    from fastsr.inference import upscale
    from fastsr.metrics import full_range_luma, psnr_y, quantize

    model = model_from_checkpoint(weights_x2).eval()
    for name, row in (("one.png", r["images"][1]), ("gray.png", r["images"][0])):
        hr = modcrop(read_image(hr_set / name).rgb.to(torch.uint8), 2)
        lr = imresize(hr, scale=0.5)
        sr = quantize(upscale(model, lr[None].float(), 2))
        if name == "gray.png":  # its own channel: the gray HR against the SR's luma
            expected = float(psnr_y(full_range_luma(sr), hr[None, :1].float(), shave=2)[0])
        else:
            expected = float(psnr_y(sr, hr[None].float(), shave=2)[0])
        assert row["psnr"] == pytest.approx(expected, abs=1e-6), name

    assert cli.main(["eval", str(hr_set), "-s", "2", "-w", str(weights_x2), "--per-image"]) == 0
    table = capsys.readouterr().out
    assert "one.png" in table and "40x32" in table and "x2 PSNR / SSIM" in table and "protocol paper" in table


def test_eval_several_sets_and_scales_one_table_and_saved_images(hr_set, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    PILImage.fromarray(_photo(45, 39)).save(other / "a.png")
    out = tmp_path / "sr"
    assert cli.main(["eval", str(hr_set), str(other), "-s", "2", "3", "--bicubic", "--save-images", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "x2 PSNR / SSIM" in lines[0] and "x3 PSNR / SSIM" in lines[0]
    assert lines[1].startswith("hr ") and lines[2].startswith("other ")
    assert "protocol paper" in lines[-1] and "bicubic" in lines[-1]
    saved = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert saved == ["hr/x2/gray.png", "hr/x2/one.png", "hr/x3/gray.png", "hr/x3/one.png",
                     "other/x2/a.png", "other/x3/a.png"]
    assert read_image(out / "other" / "x3" / "a.png").rgb.shape == (3, 45, 39)


def test_eval_reports_bad_images_and_continues(hr_set, capsys):
    (hr_set / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    PILImage.fromarray(_photo(8, 8)).save(hr_set / "tiny.png")
    PILImage.fromarray(_photo(1, 1)).save(hr_set / "dot.png")
    assert cli.main(["eval", str(hr_set), "-s", "2", "--bicubic", "--json"]) == 1
    captured = capsys.readouterr()
    r = json.loads(captured.out)["results"][0]
    assert r["n_images"] == 2 and len(r["failed"]) == 3
    errors = _errors(captured.err)
    assert any("bad.png" in e for e in errors) and any("tiny.png" in e and "8x8 is too small" in e for e in errors)
    assert any("dot.png: 1x1 is too small for x2" in e for e in errors)


def test_eval_an_image_identical_to_its_hr_is_reported_not_averaged(tmp_path, capsys):
    d = tmp_path / "flat"
    d.mkdir()
    PILImage.fromarray(np.full((24, 24, 3), 77, np.uint8)).save(d / "flat.png")  # bicubic is exact on it
    PILImage.fromarray(_photo(24, 24)).save(d / "photo.png")
    assert cli.main(["eval", str(d), "-s", "2", "--bicubic", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)["results"][0]
    assert r["infinite_psnr"] == ["flat.png"] and r["images"][0]["psnr"] == "inf"
    assert r["psnr"] == pytest.approx(r["images"][1]["psnr"])
    assert cli.main(["eval", str(d), "-s", "2", "--bicubic"]) == 0
    assert "flat.png identical to HR (infinite PSNR), left out of the PSNR mean" in capsys.readouterr().out


def test_eval_tables_are_identical_on_the_cpp_and_pytorch_imresize(hr_set, weights_x2, monkeypatch, capsys):
    """The LR images come from the C++ imresize when the extension is built, else from the
    PyTorch one: the same uint8 pixels, so the same table to the last digit."""
    import fastsr.ext as ext

    if ext.load_extension() is None:
        pytest.skip(f"the C++ extension is not available here: {ext.extension_status()}")
    tables = {}
    for backend in ("cpp", "torch"):
        real = ext.imresize_fast
        monkeypatch.setattr(ext, "imresize_fast", lambda *a, _b=backend, _r=real, **k: _r(*a, **{**k, "backend": _b}))
        assert cli.main(["eval", str(hr_set), "-s", "2", "-w", str(weights_x2), "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert ext.backend_used("imresize") == backend
        tables[backend] = [(r["dataset"], r["scale"], [(i["name"], i["psnr"], i["ssim"]) for i in r["images"]])
                           for r in result["results"]]
        monkeypatch.undo()
    assert tables["cpp"] == tables["torch"]


def test_eval_missing_folder(tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path / "nope"), "-s", "2", "--bicubic"]) == 1
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and "nope" in errors[0]


# ----------------------------------------------------------------------------- memory bound, resume


@pytest.mark.parametrize("text,expected", [
    ("2GiB", 2 << 30), ("1.5G", 3 << 29), ("800MB", 800 * 10**6), ("512m", 512 << 20),
    ("64 KiB", 64 << 10), ("1kB", 1000), ("1073741824", 1 << 30), (".5g", 1 << 29),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "2 GiBs", "-1 G", "0", "1e9", "2 gigs", "1..5G", "0.0000001K"])
def test_bad_max_memory_is_a_usage_error(tmp_path, capsys, text):
    with pytest.raises(ValueError):
        parse_size(text)
    assert cli.main(["upscale", "x.png", "-o", str(tmp_path), "-s", "2", "--max-memory", text]) == 2
    err = capsys.readouterr().err
    assert "--max-memory" in err and "2GiB" in err and "Traceback" not in err


def test_max_memory_below_the_process_itself(tmp_path, weights_x2, capsys):
    src = tmp_path / "a.png"
    PILImage.fromarray(_photo(8, 8)).save(src)
    code = cli.main(["upscale", str(src), "-o", str(tmp_path / "o"), "-s", "2", "-w", str(weights_x2),
                     "--max-memory", "10MiB"])
    errors = _errors(capsys.readouterr().err)
    assert code == 1 and len(errors) == 1
    assert "10 MiB is below what this process holds" in errors[0]
    assert not (tmp_path / "o").exists()


def test_max_memory_tiles_alpha_and_16_bit_exactly(tmp_path, weights_x2, capsys, monkeypatch):
    """Tiles chosen from the bound give the untiled output: the network's and bicubic alpha's
    context is covered, 16-bit samples stay 16-bit."""
    import fastsr.inference as inference

    d = tmp_path / "in"
    d.mkdir()
    rgba = np.concatenate([_photo(70, 90), RNG.integers(0, 256, (70, 90, 1), dtype=np.uint8)], -1)
    PILImage.fromarray(rgba).save(d / "alpha.png")
    (d / "deep.png").write_bytes(encode_png16(RNG.integers(0, 65536, (50, 61, 3), dtype=np.uint16)))
    base = ["-o", str(tmp_path / "whole"), "-s", "2", "-w", str(weights_x2)]
    assert cli.main(["upscale", str(d), *base]) == 0
    # Pretend the process holds nothing and drop the estimate's constant terms, so that a
    # 2.3 MiB bound makes both images tile (whole: 5.6 and 2.5 MB estimated; 40 px tiles fit).
    monkeypatch.setattr(inference, "process_memory_bytes", lambda: 0)
    monkeypatch.setattr(inference, "_TILE_OVERHEAD_BYTES", 0)
    monkeypatch.setattr(inference, "_PNG_STREAM_BYTES", 0)
    monkeypatch.setattr(inference, "DECODE_BYTES_PER_PIXEL", {8: 1, 16: 1})
    capsys.readouterr()
    assert cli.main(["upscale", str(d), "-o", str(tmp_path / "tiled"), "-s", "2", "-w", str(weights_x2),
                     "--max-memory", "2.3MiB"]) == 0
    err = capsys.readouterr().err
    assert err.count("tiles for --max-memory") == 2, err
    for name, step in (("alpha_x2.png", 1.0), ("deep_x2.png", 255 / 65535)):
        whole, tiled = read_image(tmp_path / "whole" / name), read_image(tmp_path / "tiled" / name)
        assert tiled.bit_depth == whole.bit_depth and tiled.rgb.shape == whole.rgb.shape, name
        # Equal up to float reassociation (convs on other shapes): one quantization step, rarely.
        diff = (tiled.rgb - whole.rgb).abs()
        assert diff.max() <= step * 1.001 and (diff > 0).float().mean() < 0.01, (name, diff.max())
        assert (whole.alpha is None) == (name == "deep_x2.png")
        if whole.alpha is not None:
            assert torch.equal(tiled.alpha, whole.alpha)


def test_impossible_bound_is_one_line_before_decoding(tmp_path, weights_x2, capsys, monkeypatch):
    src = tmp_path / "a.png"
    PILImage.fromarray(_photo(64, 64)).save(src)
    decoded = []
    real = fastsr.imageio.read_pixels
    monkeypatch.setattr("fastsr.imageio.read_pixels", lambda *a, **k: decoded.append(a) or real(*a, **k))
    monkeypatch.setattr(Upscaler, "check_memory_floor", lambda up, limit: None)
    monkeypatch.setattr(fastsr.inference, "process_memory_bytes", lambda: 100 << 20)
    code = cli.main(["upscale", str(src), "-o", str(tmp_path / "o"), "-s", "2", "-w", str(weights_x2),
                     "--max-memory", "120MiB"])
    errors = _errors(capsys.readouterr().err)
    assert code == 1 and len(errors) == 1 and decoded == []
    assert "a.png: 64x64 at x2 needs about" in errors[0] and "over --max-memory 120 MiB" in errors[0]


def test_skip_existing_resumes(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    for name in ("a", "b", "c"):
        PILImage.fromarray(_photo(6, 7)).save(d / f"{name}.png")
    out = tmp_path / "o"
    out.mkdir()
    (out / "a_x2.png").write_bytes(b"kept as is")
    (out / ".b_x2.png.k1llEd.tmp").write_bytes(b"half a PNG from a killed run")
    assert cli.main(["upscale", str(d), "-o", str(out), "-s", "2", "--bicubic", "--skip-existing"]) == 0
    assert "skipping 1 image(s)" in capsys.readouterr().err
    assert (out / "a_x2.png").read_bytes() == b"kept as is"
    assert sorted(p.name for p in out.iterdir()) == ["a_x2.png", "b_x2.png", "c_x2.png"]  # stale temp gone
    assert cli.main(["upscale", str(d), "-o", str(out), "-s", "2", "--bicubic", "--skip-existing"]) == 0
    assert "skipping 3 image(s)" in capsys.readouterr().err


def test_png_stream_round_trips_in_bands(tmp_path):
    from fastsr.pngstream import PngStream, write_png_rows

    for channels in (1, 2, 3, 4):
        for bit_depth, dtype in ((8, np.uint8), (16, np.uint16)):
            a = RNG.integers(0, np.iinfo(dtype).max + 1, (37, 29, channels)).astype(dtype)
            path = tmp_path / f"c{channels}_{bit_depth}.png"
            write_png_rows(path, (a[i : i + 5] for i in range(0, 37, 5)), 29, 37, channels, bit_depth)
            image = read_image(path)
            rgb = a[..., :3] if channels >= 3 else np.repeat(a[..., :1], 3, axis=-1)
            scale = 255.0 / 65535.0 if bit_depth == 16 else 1.0
            assert torch.equal(image.rgb, torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1) * scale)
            if channels in (2, 4):
                assert torch.equal(image.alpha, torch.from_numpy(a[..., -1].astype(np.float32)) * scale)
    with pytest.raises(ValueError, match="rows"):  # too few rows: nothing at the path
        write_png_rows(tmp_path / "short.png", [a[:10]], 29, 37, 4, 16)
    assert sorted(p.name for p in tmp_path.iterdir() if "short" in p.name) == []
    with pytest.raises(ValueError):
        PngStream(open(tmp_path / "x", "wb"), 0, 1, 3)


def test_max_pixels_is_checked_before_the_memory_bound(tmp_path, weights_x2, capsys, monkeypatch):
    src = tmp_path / "a.png"
    PILImage.fromarray(_photo(64, 64)).save(src)
    monkeypatch.setattr(Upscaler, "check_memory_floor", lambda up, limit: None)
    monkeypatch.setattr(fastsr.inference, "process_memory_bytes", lambda: 100 << 20)
    code = cli.main(["upscale", str(src), "-o", str(tmp_path / "o"), "-s", "2", "-w", str(weights_x2),
                     "--max-memory", "101MiB", "--max-pixels", "1000"])
    errors = _errors(capsys.readouterr().err)
    assert code == 1 and len(errors) == 1 and "exceeds the limit of 1,000 pixels" in errors[0]


def test_layout_and_a_guessed_res_scale_on_the_command_line(tmp_path, capsys):
    """--layout super-image runs super-image's network (0..1, no mean shift); a res_scale the
    file does not store is said in one `fastsr: warning:` line, not Python's warning text."""
    model = tiny_random(EDSR(2, n_resblocks=1, n_feats=8))
    path = tmp_path / "pytorch_model_2x.pt"
    torch.save(model.state_dict(), path)  # official key names, no metadata
    src = tmp_path / "a.png"
    PILImage.fromarray(_photo(7, 9)).save(src)
    out = {}
    for layout in ("auto", "super-image"):
        args = ["upscale", str(src), "-o", str(tmp_path / layout), "-s", "2", "-w", str(path), "--layout", layout]
        assert cli.main(args) == 0
        err = capsys.readouterr().err
        assert "fastsr: warning:" in err and "does not store res_scale" in err and "UserWarning" not in err
        out[layout] = read_image(tmp_path / layout / "a_x2.png").rgb.float()
    with torch.no_grad():
        x = read_image(src).rgb.float()[None] / 255
        h = model.head(x)
        want = (model.tail(model.body(h) + h) * 255).round().clamp(0, 255)[0]
    assert (out["super-image"] - want).abs().max() <= 1  # rounding of the last bit only
    assert (out["auto"] - want).abs().max() > 1
