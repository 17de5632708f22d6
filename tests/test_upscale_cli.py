"""`fastsr upscale` as a user runs it: --tile auto by default, progress, the overlap warning,
gray stays gray, animations keep every frame, --recursive, SIGTERM cleans up (issue 18)."""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

import fastsr.inference as inference
from fastsr import cli
from fastsr.checkpoints import model_from_checkpoint
from fastsr.imageio import encode_png16, read_image
from testenv import GLOO_THREADS_REPORT, torchrun_command


def _photo(h, w, phase=0.0):
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 100 * np.sin(x / 5.0 + phase), 128 + 100 * np.cos(y / 7.0 + phase), (x + y) % 256], -1)
    return np.clip(img, 0, 255).astype(np.uint8)


def _library_sr(weights, rgb):
    """What the library gives untiled: the reference every tiled CLI output must equal."""
    model = model_from_checkpoint(weights).eval()
    return inference.upscale(model, rgb[None], 2)[0].clamp(0, 255).round()


def _upscale(*args):
    return cli.main(["upscale", *map(str, args)])


def test_tile_auto_is_the_default_and_tiles_only_when_needed(tmp_path, weights_x2, monkeypatch, capsys):
    args = cli.build_parser().parse_args(["upscale", "a.png", "-o", "o", "-s", "2"])
    assert args.tile == "auto"
    src = tmp_path / "a.png"
    PILImage.fromarray(_photo(40, 52)).save(src)
    chosen = []
    real = inference.Upscaler.choose_tile
    monkeypatch.setattr(inference.Upscaler, "choose_tile", lambda *a: chosen.append(real(*a)) or chosen[-1])
    assert _upscale(src, "-o", tmp_path / "whole", "-s", 2, "-w", weights_x2) == 0
    assert chosen[-1] == (None, None)  # small and fits: one piece
    # Pretend only 1 MiB is free: auto tiles, and the output is still the untiled one.
    monkeypatch.setattr(inference, "free_memory_bytes", lambda device: 1 << 20)
    assert _upscale(src, "-o", tmp_path / "tiled", "-s", 2, "-w", weights_x2) == 0
    assert chosen[-1][0] is not None and chosen[-1][0] < 52
    expected = _library_sr(weights_x2, read_image(src).rgb)
    for folder in ("whole", "tiled"):
        got = read_image(tmp_path / folder / "a_x2.png").rgb
        assert (got - expected).abs().max() <= 1, folder


def test_progress_tile_is_cheap_and_gives_steps():
    for size in [(3000, 4000), (1000, 1000), (8192, 8192), (600, 800)]:
        tile = inference.progress_tile(size, 36)
        assert tile is not None and inference.tile_count(size, tile) >= 2
        assert inference.tile_cost(size, tile, 36) <= inference._PROGRESS_COST
    assert inference.tile_count((3000, 4000), inference.progress_tile((3000, 4000), 36)) >= 8
    assert inference.progress_tile((128, 128), 36) is None  # any split would cost > 15%
    assert inference.tile_cost((128, 128), None, 36) == 1.0
    # Two tiles per axis: both windows are 5 + 2 pixels long (one side is the border).
    assert inference.tile_cost((10, 10), 5, 2) == pytest.approx((7 + 7) ** 2 / 100)
    # Three: every window is the middle one's 4 + 2 * 2 (the border ones moved inward, not clipped).
    assert inference.tile_cost((12, 12), 4, 2) == pytest.approx((3 * 8) ** 2 / 144)


@pytest.mark.parametrize("h,w,tile,overlap", [(4000, 4000, 864, 6), (37, 101, 8, 5), (10, 10, 5, 2),
                                              (9, 30, 16, 40), (50, 7, 3, 0)])
def test_tile_windows_have_one_shape_and_enough_context(h, w, tile, overlap):
    windows = list(inference._tile_windows(h, w, tile, overlap))
    assert len({(cy1 - cy0, cx1 - cx0) for _, (cy0, cy1, cx0, cx1) in windows}) == 1
    covered = np.zeros((h, w), int)
    for (y0, y1, x0, x1), (cy0, cy1, cx0, cx1) in windows:
        covered[y0:y1, x0:x1] += 1
        assert 0 <= cy0 and cy1 <= h and 0 <= cx0 and cx1 <= w
        # `overlap` context on each side, or the window reaches the image's border there.
        assert (y0 - cy0 >= overlap or cy0 == 0) and (cy1 - y1 >= overlap or cy1 == h)
        assert (x0 - cx0 >= overlap or cx0 == 0) and (cx1 - x1 >= overlap or cx1 == w)
    assert (covered == 1).all()  # the tiles cut the image: every pixel once


def test_a_big_image_that_fits_gets_a_bar_over_its_tiles(tmp_path, weights_x2, monkeypatch):
    import tqdm

    bars = []

    class Recording(tqdm.tqdm):  # bars are off when stderr is not a terminal: record what they are told
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.kw, self.count = kw, 0
            bars.append(self)

        def update(self, n=1):
            self.count += n
            return super().update(n)

    monkeypatch.setattr(tqdm, "tqdm", Recording)
    src = tmp_path / "big.png"
    PILImage.fromarray(_photo(150, 200)).save(src)
    assert _upscale(src, "-o", tmp_path / "o", "-s", 2, "-w", weights_x2) == 0
    tile_bars = [b for b in bars if b.kw.get("unit") == "tile"]
    assert len(tile_bars) == 1
    bar = tile_bars[0]
    # A total (what the ETA is computed from), every tile counted.
    assert bar.kw["total"] >= 2 and bar.count == bar.kw["total"] and bar.kw["desc"] == "big.png"
    expected = _library_sr(weights_x2, read_image(src).rgb)
    assert (read_image(tmp_path / "o" / "big_x2.png").rgb - expected).abs().max() <= 1


def test_tiles_dominated_by_their_overlap_are_warned_about_once(tmp_path, weights_x2, capsys):
    d = tmp_path / "in"
    d.mkdir()
    for name in ("a.png", "b.png"):
        PILImage.fromarray(_photo(24, 24)).save(d / name)
    assert _upscale(d, "-o", tmp_path / "o", "-s", 2, "-w", weights_x2, "--tile", 3) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "the overlap dominates" in line]
    radius = inference.receptive_field_radius(model_from_checkpoint(weights_x2), 2)
    cost = inference.tile_cost((24, 24), 3, radius)
    assert len(warnings) == 1 and f"about {cost:.1f}x the work" in warnings[0] and "--tile" in warnings[0]
    assert _upscale(d, "-o", tmp_path / "o2", "-s", 2, "-w", weights_x2, "--tile", 24) == 0
    assert "the overlap dominates" not in capsys.readouterr().err


def test_gray_stays_gray(tmp_path, weights_x2):
    d = tmp_path / "in"
    d.mkdir()
    gray = _photo(13, 17)[..., 0]
    PILImage.fromarray(gray).save(d / "g.png")
    PILImage.fromarray(np.stack([gray, 255 - gray], -1), "LA").save(d / "ga.png")
    deep = (gray.astype(np.uint16) * 257)[..., None]
    (d / "g16.png").write_bytes(encode_png16(deep))
    PILImage.fromarray(_photo(13, 17)).save(d / "rgb.png")
    out = tmp_path / "o"
    assert _upscale(d, "-o", out, "-s", 2, "-w", weights_x2) == 0
    modes = {p.name: PILImage.open(p).mode for p in out.iterdir()}
    assert modes["g_x2.png"] == "L" and modes["ga_x2.png"] == "LA" and modes["rgb_x2.png"] == "RGB"
    assert modes["g16_x2.png"].startswith("I")  # 16-bit gray: I;16 (or I, by Pillow version)
    assert read_image(out / "g16_x2.png").bit_depth == 16
    # The gray output is the luma of what the network gives the gray copied to RGB.
    rgb_sr = inference.upscale(model_from_checkpoint(weights_x2).eval(), read_image(d / "g.png").rgb[None], 2)[0]
    luma = (rgb_sr.clamp(0, 255) * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0)
    got = torch.from_numpy(np.asarray(PILImage.open(out / "g_x2.png")).astype(np.float32))
    assert got.shape == (26, 34) and (got - luma).abs().max() <= 1
    two = np.asarray(PILImage.open(out / "ga_x2.png"))
    assert two.shape == (26, 34, 2) and np.array_equal(two[..., 0], np.asarray(PILImage.open(out / "g_x2.png")))


@pytest.mark.parametrize("suffix", [".gif", ".webp"])
def test_animations_keep_every_frame(tmp_path, weights_x2, suffix):
    frames = [PILImage.fromarray(_photo(10, 12, phase=k)) for k in range(3)]
    src = tmp_path / f"anim{suffix}"
    extra = {"lossless": True} if suffix == ".webp" else {}
    frames[0].save(src, save_all=True, append_images=frames[1:], duration=[40, 80, 120], loop=0, **extra)
    out = tmp_path / "o"
    assert _upscale(src, "-o", out, "-s", 2, "-w", weights_x2) == 0
    assert [p.name for p in out.iterdir()] == [f"anim_x2{suffix}"]
    with PILImage.open(out / f"anim_x2{suffix}") as im:
        assert im.n_frames == 3 and im.size == (24, 20)
        durations, pictures = [], []
        for k in range(3):
            im.seek(k)
            im.load()
            durations.append(im.info["duration"])
            pictures.append(np.asarray(im.convert("RGB")).astype(np.float32))
    assert durations == [40, 80, 120]
    expected = []
    with PILImage.open(src) as im:
        for k in range(3):
            im.seek(k)
            frame = torch.from_numpy(np.asarray(im.convert("RGB")).astype(np.float32)).permute(2, 0, 1)
            expected.append(_library_sr(weights_x2, frame).permute(1, 2, 0).numpy())
    for k in range(3):  # each frame is that frame's SR, not another's (GIF: up to its palette)
        errors = [np.abs(pictures[k] - e).mean() for e in expected]
        assert errors[k] == min(errors) and errors[k] < 0.5 * min(e for j, e in enumerate(errors) if j != k)
        if suffix == ".webp":  # lossless
            assert np.abs(pictures[k] - expected[k]).max() <= 1


def test_recursive_keeps_the_folder_structure(tmp_path, capsys):
    d = tmp_path / "in"
    (d / "a").mkdir(parents=True)
    (d / "b" / "c").mkdir(parents=True)
    (d / ".hidden").mkdir()
    for rel in ("top.png", "a/x.png", "b/c/x.png", ".hidden/no.png"):
        PILImage.fromarray(_photo(6, 7)).save(d / rel)
    out = d / "out"  # inside the input folder: never read back as input
    assert _upscale(d, "-o", out, "-s", 2, "--bicubic") == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == ["top_x2.png"]
    assert "2 subfolder(s) not read (--recursive reads them)" in capsys.readouterr().err  # a, b (out is new)
    assert _upscale(d, "-o", out, "-s", 2, "--bicubic", "--recursive") == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == ["a/x_x2.png", "b/c/x_x2.png", "top_x2.png"]
    assert "out/" not in capsys.readouterr().err


def test_sigterm_leaves_no_temp_file(tmp_path, weights_x2):
    """The real entry point in a child process: SIGTERM mid-write removes the temp file (as
    Ctrl-C does), exit status 143, one line, no traceback."""
    src = tmp_path / "a.png"
    PILImage.fromarray(_photo(96, 96)).save(src)
    out = tmp_path / "o"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fastsr", "upscale", str(src), "-o", str(out), "-s", "2",
                             "-w", str(weights_x2), "--tile", "2"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and any(p.name.endswith(".tmp") for p in out.iterdir())):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no temp file appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    assert list(out.iterdir()) == []


# `fastsr upscale` under torchrun, every PNG write logged with the rank that made it, then
# the names of the gloo threads still running in this process.
TORCHRUN_DRIVER = r"""
import os, sys
import fastsr.pngstream as pngstream
import fastsr.video as video
from fastsr.cli import main

def logged(path, write, real=pngstream.atomic_write):
    with open(os.path.join(os.environ["WRITE_LOG"], f"rank{os.environ['RANK']}.txt"), "a") as f:
        f.write(f"{path}\n")
    return real(path, write)
pngstream.atomic_write = video.atomic_write = logged
code = main(sys.argv[1:])
""" + GLOO_THREADS_REPORT


def test_torchrun_splits_the_files_over_two_gloo_ranks(tmp_path, weights_x2):
    """9 images and a broken file go round 2 gloo ranks; a video's frames are split between them."""
    import importlib.util

    d = tmp_path / "in"
    d.mkdir()
    for i in range(9):
        PILImage.fromarray(_photo(8 + i, 9, phase=i)).save(d / f"img{i}.png")
    (d / "broken.png").write_text("not a png\n")
    video = importlib.util.find_spec("av") is not None
    if video:
        _write_clip(d / "clip.mp4", np.stack([_photo(12, 16, phase=k) for k in range(5)]), rate=10)
    logs = tmp_path / "logs"
    logs.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(TORCHRUN_DRIVER)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WRITE_LOG": str(logs)}
    r = subprocess.run([*torchrun_command(2, driver), "upscale", str(d), "-o", str(out), "-s", "2",
                        "-w", str(weights_x2)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0, r.stderr[-3000:]  # broken.png: a problem reported, on both ranks
    writes = {rank: (logs / f"rank{rank}.txt").read_text().split() for rank in (0, 1)}
    pngs = {rank: [w for w in writes[rank] if w.endswith(".png")] for rank in (0, 1)}
    assert all(pngs.values()), writes  # both ranks did some of the images
    assert sorted(pngs[0] + pngs[1]) == sorted(str(out / f"img{i}_x2.png") for i in range(9))  # each once
    names = sorted(f"img{i}_x2.png" for i in range(9)) + (["clip_x2.mp4"] if video else [])
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no part file left
    if video:  # each rank wrote its part of the frames, rank 0 the joined file
        assert [w for w in writes[1] if w.endswith(".mp4")] == [str(out / ".clip_x2.part1.mp4")]
        assert [w for w in writes[0] if w.endswith(".mp4")] == [str(out / n) for n in (".clip_x2.part0.mp4", "clip_x2.mp4")]
        lr, lr_pts, _, lr_audio = _decode(d / "clip.mp4")
        sr, sr_pts, _, sr_audio = _decode(out / "clip_x2.mp4")
        assert sr.shape == (5, 24, 32, 3) and sr_audio == lr_audio
        assert [p - sr_pts[0] for p in sr_pts] == [p - lr_pts[0] for p in lr_pts]
        for k in range(5):
            expected = _library_sr(weights_x2, torch.from_numpy(lr[k]).permute(2, 0, 1).float()).permute(1, 2, 0)
            assert np.abs(sr[k] - expected.numpy()).mean() < 4, k
    for i in (0, 8):
        expected = _library_sr(weights_x2, read_image(d / f"img{i}.png").rgb)
        assert (read_image(out / f"img{i}_x2.png").rgb - expected).abs().max() <= 1
    err = r.stderr
    n = 10 + video
    assert err.count(f"upscaling {n} image(s) over 2 ranks") == 1
    assert err.count(f"wrote {n - 1} of {n} image(s)") == 1 and err.count("1 problem(s) reported") == 1
    assert len([line for line in err.splitlines() if line.startswith("fastsr: error:") and "broken.png" in line]) == 1
    # torchrun prints its own traceback (ChildFailedError) for a rank's exit status 1: none from fastsr.
    assert not re.search(r'File "[^"]*fastsr/', err), err
    if os.path.isdir("/proc/self/task"):  # the process group ended with the command: gloo's threads joined
        assert r.stdout.count("gloo threads left: []") == 2, r.stdout


# ----------------------------------------------------------------------------- video


def _write_clip(path, frames, rate, audio_seconds=0.5):
    """A test clip: H.264 frames (N, H, W, 3) uint8 at `rate` fps, and an AAC sine track."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=rate)
        video.height, video.width = frames.shape[1:3]
        video.pix_fmt, video.options = "yuv420p", {"crf": "0"}
        audio = out.add_stream("aac", rate=8000)
        for pixels in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        t = np.arange(int(8000 * audio_seconds)) / 8000
        tone = av.AudioFrame.from_ndarray((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None],
                                          format="fltp", layout="mono")
        tone.sample_rate, tone.pts = 8000, 0
        for packet in [*audio.encode(tone), *audio.encode()]:
            out.mux(packet)


def _decode(path):
    """(frames (N, H, W, 3) uint8, their pts, average rate, audio packets (pts, bytes)) of a clip."""
    import av

    with av.open(str(path)) as c:
        v = c.streams.video[0]
        frames, pts = zip(*[(f.to_ndarray(format="rgb24"), f.pts) for f in c.decode(v)])
        rate = v.average_rate
    with av.open(str(path)) as c:
        audio = [(p.pts, bytes(p)) for p in c.demux(c.streams.audio[0]) if p.dts is not None]
    return np.stack(frames), list(pts), rate, audio


def test_video_round_trips_every_frame_at_2x_with_its_audio(tmp_path, weights_x2):
    frames = np.stack([_photo(20, 24, phase=k) for k in range(6)])
    src = tmp_path / "clip.mp4"
    _write_clip(src, frames, rate=12)
    out = tmp_path / "o"
    assert _upscale(src, "-o", out, "-s", 2, "-w", weights_x2, "--batch", 4) == 0  # batches of 4 and 2
    assert [p.name for p in out.iterdir()] == ["clip_x2.mp4"]
    lr, lr_pts, lr_rate, lr_audio = _decode(src)
    sr, sr_pts, sr_rate, sr_audio = _decode(out / "clip_x2.mp4")
    assert sr.shape == (6, 40, 48, 3) and sr_rate == lr_rate == 12
    assert [p - sr_pts[0] for p in sr_pts] == [p - lr_pts[0] for p in lr_pts]  # same timing
    assert sr_audio == lr_audio and len(sr_audio) > 0  # copied, not re-encoded
    for k in range(6):  # each frame is that frame's SR (H.264 at CRF 18: close, not exact)
        expected = _library_sr(weights_x2, torch.from_numpy(lr[k]).permute(2, 0, 1).float()).permute(1, 2, 0).numpy()
        errors = [np.abs(sr[k].astype(np.float32) - _library_sr(
            weights_x2, torch.from_numpy(lr[j]).permute(2, 0, 1).float()).permute(1, 2, 0).numpy()).mean()
            for j in range(6)]
        assert np.abs(sr[k] - expected).mean() < 4 and errors[k] == min(errors), (k, errors)


def test_video_without_pyav_is_one_line_and_the_images_still_run(tmp_path, monkeypatch, capsys):
    d = tmp_path / "in"
    d.mkdir()
    (d / "clip.mp4").write_bytes(b"\x00" * 64)
    PILImage.fromarray(_photo(6, 7)).save(d / "a.png")
    monkeypatch.setitem(sys.modules, "av", None)  # import av raises ImportError
    assert _upscale(d, "-o", tmp_path / "o", "-s", 2, "--bicubic") == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastsr: error:")]
    assert len(errors) == 1 and "clip.mp4" in errors[0] and "pip install 'fastsr[video]'" in errors[0]
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["a_x2.png"]


def test_max_memory_alone_prints_no_warning(tmp_path, weights_x2, capsys):
    """The floor check's probe input is mid-gray: all-zero input would trip the 0..1-range warning."""
    src = tmp_path / "a.png"
    PILImage.fromarray(_photo(16, 16)).save(src)
    assert _upscale(src, "-o", tmp_path / "o", "-s", 2, "-w", weights_x2, "--max-memory", "8GiB") == 0
    assert "warning" not in capsys.readouterr().err


def test_max_memory_drops_the_last_images_shape_state_when_the_size_changes(tmp_path, weights_x2, monkeypatch):
    """Under --max-memory each image is planned against what the process holds; what a
    previous image of another size left (OpenVINO's compiled shapes, the kept heap) is dropped
    first, since the new tiles cannot use it. Images of one size keep it."""
    d = tmp_path / "in"
    d.mkdir()
    for name, (h, w) in {"a.png": (16, 20), "b.png": (16, 20), "c.png": (12, 9)}.items():
        PILImage.fromarray(_photo(h, w)).save(d / name)
    events = []
    real_baseline = inference.Upscaler.memory_baseline
    monkeypatch.setattr(inference.Upscaler, "memory_baseline",
                        lambda self, size: events.append(("plan", size)) or real_baseline(self, size))
    monkeypatch.setattr(inference.Upscaler, "release_shape_caches", lambda self: events.append(("release",)))
    assert _upscale(d, "-o", tmp_path / "o", "-s", 2, "-w", weights_x2, "--max-memory", "8GiB") == 0
    assert events == [("plan", (16, 20)), ("plan", (16, 20)), ("plan", (12, 9)), ("release",)]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a_x2.png", "b_x2.png", "c_x2.png"]
