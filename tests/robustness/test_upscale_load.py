"""Load tests for `fastsr upscale`: 1,000 small images, one very large image under
--max-memory, and SIGKILL at random moments (atomic outputs; --skip-existing resumes).

Every run is a subprocess that reports its own peak resident memory (VmHWM of
/proc/self/status, at exit). Not ru_maxrss from wait4 / RUSAGE_CHILDREN: Linux carries the
parent's high-water mark into a forked child across exec, so a child of a 1.4 GB pytest
process "peaks" at 1.4 GB whatever it does. The network is a tiny EDSR (1 block, 4 features) saved with
save_safetensors: decoding, tiling, the streaming PNG writer and the memory planning are
the same as with the shipped EDSR-baseline, at a cost CI can pay (the shipped x2 model
takes ~0.2 s per small image on 2 cores and minutes for a large one).

The large image is 4000 x 4000 in CI (~15 s); FASTSR_LOAD_FULL=1 runs 8000 x 8000 too
(~45 s on 2 cores; its x2 output is 16000 x 16000, 768 MB as uint8, 3 GB as float32).
Figures of the last runs are in tests/robustness/README.md.
"""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from fastsr.checkpoints import model_from_checkpoint, save_safetensors
from fastsr.imageio import read_image
from fastsr.inference import upscale
from fastsr.models import EDSR

MiB = 1 << 20
# The child counts model loads (the model must be loaded once for all images) and reports
# its peak resident memory.
CHILD = """
import sys
import fastsr.checkpoints as checkpoints
loads = []
real = checkpoints.model_from_checkpoint
def counted(*args, **kwargs):
    loads.append(args)
    return real(*args, **kwargs)
checkpoints.model_from_checkpoint = counted
from fastsr.cli import main
try:
    code = main(sys.argv[1:])
finally:
    with open("/proc/self/status") as f:
        peak = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    print(f"model loads: {len(loads)}", file=sys.stderr)
    print(f"peak resident kB: {peak}", file=sys.stderr)
sys.exit(code)
"""
pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for VmHWM")


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    model = EDSR(2, n_resblocks=1, n_feats=4)
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.05
    return save_safetensors(model, tmp_path_factory.mktemp("weights") / "tiny_x2.safetensors")


def _start(args, log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-c", CHILD, "upscale", *map(str, args)],
                                stdout=f, stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, log: Path, timeout: float = 600) -> tuple[int, int, str]:
    """Wait for the child: (exit status, its peak resident bytes, its output)."""
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"fastsr upscale did not finish in {timeout} s:\n{log.read_text()[-2000:]}")
    out = log.read_text()
    peaks = [int(line.split()[-1]) * 1024 for line in out.splitlines() if line.startswith("peak resident kB:")]
    assert len(peaks) == 1, out[-3000:]
    return code, peaks[0], out


def _run(args, log: Path) -> tuple[int, int, str, float]:
    start = time.perf_counter()
    code, peak, out = _wait(_start(args, log), log)
    return code, peak, out, time.perf_counter() - start


def _report(what: str, **figures) -> None:
    print(f"\n[load] {what}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def _expected(model, src: Path) -> np.ndarray:
    """What the output PNG must hold: the library call on the decoded input, quantized."""
    image = read_image(src)
    sr = upscale(model, image.rgb[None], 2)[0].clamp(0, 255).round().to(torch.uint8)
    return sr.permute(1, 2, 0).numpy()


def _pixels(path: Path) -> np.ndarray:
    saved, PILImage.MAX_IMAGE_PIXELS = PILImage.MAX_IMAGE_PIXELS, None  # our 16000 x 16000 output
    try:
        with PILImage.open(path) as im:
            im.load()
            return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    finally:
        PILImage.MAX_IMAGE_PIXELS = saved


# ------------------------------------------------------------------ 1,000 small images


def test_thousand_small_images_under_bound(tmp_path, tiny_weights):
    rng = np.random.default_rng(2026)
    src = tmp_path / "in"
    src.mkdir()
    sizes = {}
    for i in range(1000):
        h, w = (int(v) for v in rng.integers(8, 25, 2))
        y, x = np.mgrid[0:h, 0:w]
        smooth = np.stack([128 + 90 * np.sin(x / 3.0 + i), 128 + 90 * np.cos(y / 4.0), (x * y + i) % 256], -1)
        pixels = (rng.integers(0, 256, (h, w, 3)) if i % 2 else smooth).astype(np.uint8)
        if i % 10 == 3:
            pixels = pixels[..., 0]  # gray in, gray out
        PILImage.fromarray(pixels).save(src / f"img{i:04d}.png")
        sizes[f"img{i:04d}_x2.png"] = (2 * w, 2 * h)
    bound = 1024 * MiB
    out = tmp_path / "out"
    code, peak, log, seconds = _run([src, "-o", out, "-s", 2, "-w", tiny_weights, "--max-memory", "1GiB"],
                                    tmp_path / "log")
    _report("1000 images 8..24 px, x2, tiny EDSR", peak_MiB=peak // MiB, bound_MiB=bound // MiB,
            seconds=round(seconds, 1))
    assert code == 0, log[-3000:]
    assert "model loads: 1" in log
    written = {p.name: p for p in out.iterdir()}
    assert set(written) == set(sizes)  # and nothing else: no temp files
    for name, path in written.items():
        with PILImage.open(path) as im:
            assert im.size == sizes[name] and im.mode == ("L" if int(name[3:7]) % 10 == 3 else "RGB"), name
    model = model_from_checkpoint(tiny_weights, fused=True).eval()
    for i in rng.choice(1000, 12, replace=False):
        expected = _expected(model, src / f"img{i:04d}.png")
        got = _pixels(out / f"img{i:04d}_x2.png")
        if i % 10 == 3:  # gray: the luma of the network's RGB output, L = 0.299 R + 0.587 G + 0.114 B
            luma = expected.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
            assert np.abs(got[..., 0].astype(np.float64) - luma).max() <= 1, i
        else:
            assert np.array_equal(got, expected), i
    assert peak <= bound, f"peak RSS {peak / MiB:.0f} MiB over --max-memory 1GiB"


# ------------------------------------------------------------------ one large image


def _large_png(path: Path, n: int) -> Path:
    """Smooth synthetic content (it compresses fast; noise would make zlib the bottleneck)."""
    y = np.arange(n, dtype=np.float32)[:, None]
    x = np.arange(n, dtype=np.float32)[None, :]
    img = np.empty((n, n, 3), np.uint8)
    img[..., 0] = 128 + 100 * np.sin(x / 37.0)
    img[..., 1] = 128 + 100 * np.cos(y / 53.0)
    img[..., 2] = (x + y) % 256
    PILImage.fromarray(img).save(path, compress_level=1)
    return path


LARGE = [pytest.param(4000, "900MiB", id="4000px")]
if os.environ.get("FASTSR_LOAD_FULL"):
    LARGE.append(pytest.param(8000, "1.5GiB", id="8000px"))


@pytest.mark.parametrize("n,bound", LARGE)
def test_large_image_under_bound(tmp_path, tiny_weights, n, bound):
    from fastsr.cli.common import parse_size

    src = _large_png(tmp_path / "large.png", n)
    out = tmp_path / "out"
    code, peak, log, seconds = _run([src, "-o", out, "-s", 2, "-w", tiny_weights, "--max-memory", bound],
                                    tmp_path / "log")
    _report(f"{n}x{n} -> {2 * n}x{2 * n}, tiny EDSR", peak_MiB=peak // MiB, bound=bound,
            seconds=round(seconds, 1), plan=[line for line in log.splitlines() if "tiles for" in line])
    assert code == 0, log[-3000:]
    assert "tiles for --max-memory" in log  # it had to tile: the whole image would not fit
    assert peak <= parse_size(bound), f"peak RSS {peak / MiB:.0f} MiB over --max-memory {bound}"
    assert [p.name for p in out.iterdir()] == ["large_x2.png"]
    # Tiles must not show: windows across the image (seams included) match the model run
    # on that window plus context (8 >= the network's receptive-field radius, 6 LR pixels).
    model = model_from_checkpoint(tiny_weights, fused=True).eval()
    lr = torch.from_numpy(_pixels(src).copy()).permute(2, 0, 1).float()
    out_pixels = _pixels(out / "large_x2.png")
    assert out_pixels.shape == (2 * n, 2 * n, 3)
    c = 8
    for y0, x0 in [(0, 0), (n // 3 - 20, n // 2 - 20), (n - 40, n - 40), (1290, 1290)]:
        y0, x0 = min(max(0, y0), n - 40), min(max(0, x0), n - 40)
        cy0, cx0 = max(0, y0 - c), max(0, x0 - c)
        window = lr[:, cy0 : y0 + 40 + c, cx0 : x0 + 40 + c][None]
        sr = upscale(model, window, 2)[0].clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        oy, ox = 2 * (y0 - cy0), 2 * (x0 - cx0)
        got = out_pixels[2 * y0 : 2 * y0 + 80, 2 * x0 : 2 * x0 + 80]
        diff = np.abs(got.astype(int) - sr[oy : oy + 80, ox : ox + 80].astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (y0, x0)  # float reassociation at most


def test_impossible_bound_is_refused_before_decoding(tmp_path, tiny_weights):
    src = _large_png(tmp_path / "large.png", 4000)  # decoding alone takes ~16 B/px: 256 MB
    code, peak, log, seconds = _run([src, "-o", tmp_path / "out", "-s", 2, "-w", tiny_weights,
                                     "--max-memory", "560MiB"], tmp_path / "log")
    _report("4000x4000 under 560MiB: refused", peak_MiB=peak // MiB, seconds=round(seconds, 1))
    errors = [line for line in log.splitlines() if line.startswith("fastsr: error:")]
    assert code == 1 and len(errors) == 1, log
    assert "needs about" in errors[0] and "large.png" in errors[0] and "--max-memory" in errors[0]
    assert "Traceback" not in log
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert peak < 560 * MiB  # it never decoded the 4000x4000 image


# ------------------------------------------------------------------ SIGKILL at random moments


def test_sigkill_leaves_no_partial_png_and_resume_completes(tmp_path, tiny_weights):
    rng = np.random.default_rng(11)
    src = tmp_path / "in"
    src.mkdir()
    n_images = 24
    for i in range(n_images):  # one size: the tiles' shapes repeat, so oneDNN's primitives are reused
        PILImage.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(src / f"p{i:02d}.png")
    common = ["-s", 2, "-w", tiny_weights, "--tile", 32]  # 3 bands per image: kills land mid-file
    ref = tmp_path / "ref"
    code, _, log, seconds = _run([src, "-o", ref, *common], tmp_path / "ref.log")
    assert code == 0, log
    expected = {p.name: _pixels(p) for p in ref.iterdir()}
    assert len(expected) == n_images

    out = tmp_path / "out"
    pick = random.Random(5)
    kills = []  # (complete PNGs, temp files) after each kill
    for attempt in range(4):
        proc = _start([src, "-o", out, *common, "--skip-existing"], tmp_path / f"kill{attempt}.log")
        # Kill after a random number of further outputs (0..4), at a random moment after
        # the temp file of the one being written appears.
        def pngs():
            return sum(1 for p in out.iterdir() if p.suffix == ".png") if out.is_dir() else 0

        goal = min(n_images - 1, pngs() + pick.randint(0, 4))
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if pngs() >= goal and any(p.suffix == ".tmp" for p in out.iterdir()):
                break
            time.sleep(0.002)
        time.sleep(pick.uniform(0.0, 0.05))
        if proc.poll() is not None:
            break  # finished before the kill: nothing left to interrupt
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        names = sorted(p.name for p in out.iterdir())
        complete = [n for n in names if n.endswith(".png")]
        temps = [n for n in names if not n.endswith(".png")]
        kills.append((len(complete), len(temps)))
        for name in temps:  # what atomic_write leaves: ".<target>.<random>.tmp", never "*.png"
            assert name.startswith(".") and name.endswith(".tmp") and name[1:].split(".png.")[0] + ".png" in expected
        for name in complete:
            assert np.array_equal(_pixels(out / name), expected[name]), (attempt, name)
    _report("SIGKILL runs", kills_complete_and_temp=kills, reference_seconds=round(seconds, 1))
    assert kills and any(t for _, t in kills), "no kill landed while a PNG was being written"
    code, _, log, _ = _run([src, "-o", out, *common, "--skip-existing"], tmp_path / "final.log")
    assert code == 0, log
    if kills[-1][0]:
        assert f"skipping {kills[-1][0]} image(s)" in log
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(expected)  # every output, and the killed runs' temp files are gone
    for name in names:
        assert np.array_equal(_pixels(out / name), expected[name]), name
