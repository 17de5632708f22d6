"""The C++ extension fastsr._C (fastsr/ext.py, csrc/): parity with the PyTorch versions,
the Set5 bicubic baselines through the C++ imresize, patch alignment/augmentation and
determinism, the uint8 output path, TORCH_CHECK messages, and the fallbacks.

The extension is built once per session (about a minute on 2 cores, then cached under
~/.cache/fastsr/ext). Without a C++ compiler or ninja the C++ tests skip; with them, a
failed build fails the tests."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
import torch
from testenv import REPO_ROOT, shared_set
from PIL import Image

from fastsr import ext
from fastsr.data import crop_pair
from fastsr.errors import BackendUnavailable
from fastsr.imresize import imresize, modcrop
from fastsr.metrics import psnr_y

SCALES = [1 / 2, 1 / 3, 1 / 4, 2, 3, 4]


def _toolchain() -> bool:
    from torch.utils.cpp_extension import is_ninja_available

    return shutil.which(os.environ.get("CXX", "c++")) is not None and is_ninja_available()


@pytest.fixture(scope="module")
def ops():
    if os.environ.get("FASTSR_NO_EXT", "").strip() not in ("", "0"):
        pytest.skip("FASTSR_NO_EXT is set")
    if not _toolchain():
        pytest.skip("no C++ compiler or ninja: the extension cannot be built here")
    loaded = ext.load_extension()
    assert loaded is not None, f"the extension did not build: {ext.extension_status()}"
    return loaded


def _rand_image(shape, dtype, gen):
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    return torch.rand(shape, dtype=dtype, generator=gen)


def _assert_uint8_close(out, ref):
    # Equal in practice; a pixel may differ by one level only where a pre-rounding value
    # is within float64 noise of .5 (sparse vs dense summation order).
    diff = (out.int() - ref.int()).abs()
    assert diff.max().item() <= 1
    assert (diff > 0).float().mean().item() <= 1e-3


# ---------------------------------------------------------------------------------------
# imresize
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 3, 37, 29), (1, 1, 17, 7), (3, 23, 40), (11, 13)])
def test_imresize_matches_pytorch(ops, dtype, shape):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype}{shape}".encode()))
    img = _rand_image(shape, dtype, gen)
    for kwargs in [{"scale": s} for s in SCALES] + [{"size": (19, 44)}, {"size": (5, 3)}, {"scale": 1}]:
        out = ext.imresize_fast(img, **kwargs)
        assert ext.backend_used("imresize") == "cpp"
        ref = imresize(img, **kwargs)
        assert out.shape == ref.shape and out.dtype == ref.dtype, kwargs
        if dtype == torch.uint8:
            _assert_uint8_close(out, ref)
        else:
            tol = 1e-5 if dtype == torch.float32 else 1e-12
            torch.testing.assert_close(out, ref, atol=tol, rtol=0, msg=str(kwargs))


def test_imresize_strided_no_antialias_and_threads(ops):
    gen = torch.Generator().manual_seed(1)
    base = _rand_image((2, 3, 61, 50), torch.uint8, gen)
    strided = base[:, :, 3:50:2, ::3]  # not contiguous
    for scale in (1 / 3, 2.5):
        _assert_uint8_close(ext.imresize_fast(strided, scale), imresize(strided, scale))
        f = strided.float() / 255
        torch.testing.assert_close(ext.imresize_fast(f, scale, antialias=False),
                                   imresize(f, scale, antialias=False), atol=1e-5, rtol=0)
    # Work is split by rows: the result does not depend on the thread count.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.imresize(base, 0.37, None, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, ops.imresize(base, 0.37, None, True))


def test_imresize_empty_batch_and_constant(ops):
    img = torch.zeros(0, 3, 9, 8)
    assert ops.imresize(img, 0.5, None, True).shape == (0, 3, 5, 4)
    flat = torch.full((1, 1, 9, 9), 200, dtype=torch.uint8)
    assert torch.equal(ops.imresize(flat, 1 / 3, None, True), torch.full((1, 1, 3, 3), 200, dtype=torch.uint8))


def test_imresize_set5_bicubic_baseline(ops):
    folder = shared_set("Set5")
    published = {2: 33.66, 3: 30.39, 4: 28.42}
    for scale, target in published.items():
        psnrs = []
        for path in sorted(folder.glob("*.png")):
            hr = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
            hr = modcrop(hr.contiguous(), scale)
            lr = ext.imresize_fast(hr, 1 / scale)
            sr = ext.imresize_fast(lr, scale)
            assert torch.equal(lr, imresize(hr, 1 / scale))  # the C++ images are the Python ones
            psnrs.append(psnr_y(sr, hr, shave=scale).item())
        psnr = float(np.mean(psnrs))
        assert abs(psnr - target) <= 0.03, (scale, psnr, target)


# ---------------------------------------------------------------------------------------
# Patch sampler
# ---------------------------------------------------------------------------------------


def _pairs(scale: int, gen, n: int = 4):
    """Random LR images and HR images made from them by nearest upsampling (each LR pixel
    an s x s block), plus a spare HR border so crop extents come from both sides."""
    lrs, hrs = [], []
    for i in range(n):
        h, w = 20 + 7 * i, 31 - 3 * i
        lr = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)
        hr = lr.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        if i % 2:  # HR a bit larger (ignored), or LR a row larger than HR // s
            hr = torch.cat([hr, torch.zeros(3, scale - 1 if scale > 1 else 0, hr.shape[2], dtype=torch.uint8)], 1)
        else:
            lr = torch.cat([lr, torch.zeros(3, 1, w, dtype=torch.uint8)], 1)
        lrs.append(lr.contiguous())
        hrs.append(hr.contiguous())
    return lrs, hrs


@pytest.mark.parametrize("scale", [1, 2, 3, 4])
@pytest.mark.parametrize("patch", [8, 9])  # HR sides multiples of 8 take the 8x8-block transpose
def test_patches_aligned_and_as_crop_pair(ops, scale, patch):
    gen = torch.Generator().manual_seed(scale)
    lrs, hrs = _pairs(scale, gen)
    out = ext.sample_patches(lrs, hrs, scale, patch, 48, seed=1000 + scale)
    assert ext.backend_used("sample_patches") == "cpp"
    assert out.lr.shape == (48, 3, patch, patch) and out.hr.shape == (48, 3, scale * patch, scale * patch)
    assert out.lr.dtype == out.hr.dtype == torch.float32 and out.params.shape == (48, 6)
    # Each HR patch is its LR patch upsampled by nearest, whatever the flips/transpose.
    up = out.lr.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    assert torch.equal(up, out.hr)
    for k in range(48):
        i, top, left, hf, vf, tr = out.params[k].tolist()
        crop_h = min(lrs[i].shape[1], hrs[i].shape[1] // scale)
        crop_w = min(lrs[i].shape[2], hrs[i].shape[2] // scale)
        assert 0 <= top <= crop_h - patch and 0 <= left <= crop_w - patch
        lr_ref, hr_ref = crop_pair(lrs[i], hrs[i], scale, top, left, patch, bool(hf), bool(vf), bool(tr))
        assert torch.equal(out.lr[k], lr_ref) and torch.equal(out.hr[k], hr_ref)


def test_patches_deterministic_layouts_and_backends(ops):
    gen = torch.Generator().manual_seed(7)
    lrs = [torch.randint(0, 256, (3, 30 + i, 41 - i), dtype=torch.uint8, generator=gen) for i in range(5)]
    hrs = [torch.randint(0, 256, (3, 2 * (30 + i) + 1, 2 * (41 - i)), dtype=torch.uint8, generator=gen)
           for i in range(5)]
    a = ext.sample_patches(lrs, hrs, 2, 12, 33, seed=42)
    b = ext.sample_patches(lrs, hrs, 2, 12, 33, seed=42)
    c = ext.sample_patches(lrs, hrs, 2, 12, 33, seed=43)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.params, c.params)
    # The PyTorch path draws the same splitmix64 numbers: identical batches.
    t = ext.sample_patches(lrs, hrs, 2, 12, 33, seed=42, backend="torch")
    assert ext.backend_used("sample_patches") == "torch"
    assert all(torch.equal(x, y) for x, y in zip(a, t))
    # HWC images (and non-contiguous views of a bigger buffer) give the same batch.
    hwc_l = [x.permute(1, 2, 0).contiguous() for x in lrs]
    hwc_h = [torch.zeros(x.shape[1], x.shape[2] + 5, 3, dtype=torch.uint8) for x in hrs]
    for buf, x in zip(hwc_h, hrs):
        buf[:, 2:-3] = x.permute(1, 2, 0)
    hwc_h = [buf[:, 2:-3] for buf in hwc_h]
    h = ext.sample_patches(hwc_l, hwc_h, 2, 12, 33, seed=42, layout="HWC")
    assert all(torch.equal(x, y) for x, y in zip(a, h))
    # Seeds are taken mod 2**64 in both backends.
    neg = ext.sample_patches(lrs, hrs, 2, 12, 4, seed=-5)
    assert torch.equal(neg.params, ext.sample_patches(lrs, hrs, 2, 12, 4, seed=2**64 - 5).params)
    assert torch.equal(neg.params, ext.sample_patches(lrs, hrs, 2, 12, 4, seed=-5, backend="torch").params)
    # Thread count does not change a batch (counter-based draws, one sample per task).
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.sample_patches(lrs, hrs, 2, 12, 33, 42, "CHW")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[1], a.hr)


def test_patches_cover_all_augmentations_and_positions(ops):
    lr = torch.arange(3 * 10 * 11, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(3, 10, 11)
    hr = lr.repeat_interleave(2, 1).repeat_interleave(2, 2)
    p = ext.sample_patches([lr, lr[:, :9]], [hr, hr[:, :18]], 2, 8, 4000, seed=3).params
    flags = p[:, 3] * 4 + p[:, 4] * 2 + p[:, 5]
    counts = torch.bincount(flags, minlength=8)
    assert counts.min() > 400  # 8 equally likely combinations of 4000 draws: ~500 each
    assert set(p[:, 0].tolist()) == {0, 1}
    assert set(p[p[:, 0] == 0, 1].tolist()) == {0, 1, 2} and set(p[:, 2].tolist()) == {0, 1, 2, 3}
    assert set(p[p[:, 0] == 1, 1].tolist()) == {0, 1}


def test_patch_draws_documented_stream():
    # splitmix64 seeded with 0 starts 0xE220A8397B1DCDAF (the reference sequence).
    assert ext._splitmix64_at(0, 0) == 0xE220A8397B1DCDAF
    draws = ext.patch_draws(3, [50, 60, 70], [40, 40, 40], 8, 5, seed=9)
    for b, (img, top, left, *_) in enumerate(draws):
        r = ext._splitmix64_at(9, 4 * b)
        assert img == (r * 3) >> 64 and 0 <= top <= [50, 60, 70][img] - 8 and 0 <= left <= 32


# ---------------------------------------------------------------------------------------
# Output path
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_to_uint8_hwc(ops, dtype):
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 3, 17, 23, generator=gen) * 150 + 128).to(dtype)
    x[0, 0, 0, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, 254.5, 255.5, -300.0, 1e4], dtype=dtype)
    ref = torch.round(x).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    out = ext.to_uint8_hwc(x)
    assert ext.backend_used("to_uint8_hwc") == "cpp"
    assert out.is_contiguous() and torch.equal(out, ref)
    assert out[0, 0, :6, 0].tolist() == [0, 2, 2, 0, 254, 255]  # halves to even, like torch.round
    assert torch.equal(ext.to_uint8_hwc(x[1]), ref[1])
    strided = x[:, :, ::2, 1::2]
    strided_ref = torch.round(strided).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(ext.to_uint8_hwc(strided), strided_ref)
    assert torch.equal(ext.to_uint8_hwc(x, backend="torch"), ref)
    gray = x[:, :1]
    assert torch.equal(ext.to_uint8_hwc(gray), ref[..., :1])


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


def test_torch_check_messages(ops):
    img = torch.zeros(3, 8, 8, dtype=torch.uint8)
    cases = [
        (lambda: ops.imresize(img.int(), 0.5, None, True), "uint8, float32 or float64, got Int"),
        (lambda: ops.imresize(img, -1.0, None, True), "positive finite number, got -1"),
        (lambda: ops.imresize(img, 0.5, [4, 4], True), "exactly one of scale= or size=, got both"),
        (lambda: ops.imresize(img, None, [4, 0], True), "size entries must be positive"),
        (lambda: ops.imresize(img[0, 0], 0.5, None, True), "(H, W), (C, H, W) or (N, C, H, W), got 1 dims"),
        (lambda: ops.sample_patches([img], [img, img], 2, 4, 1, 0, "CHW"), "same number of images, got 1 and 2"),
        (lambda: ops.sample_patches([img], [img], 2, 5, 1, 0, "CHW"), "image 0 is too small"),
        (lambda: ops.sample_patches([img.float()], [img], 1, 4, 1, 0, "CHW"), "lr[0] must be uint8, got Float"),
        (lambda: ops.sample_patches([img], [img], 0, 4, 1, 0, "CHW"), "scale must be a positive int, got 0"),
        (lambda: ops.sample_patches([img], [img], 1, 4, 1, 0, "NHWC"), 'layout must be "CHW" or "HWC"'),
        (lambda: ops.sample_patches([img[0]], [img[0]], 1, 4, 1, 0, "CHW"), "must have shape (C, H, W)"),
        (lambda: ops.to_uint8_hwc(img), "must be a floating tensor"),
        (lambda: ops.to_uint8_hwc(img[0].float()), "(N, C, H, W) or (C, H, W), got 2 dims"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError) as info:
            call()
        assert message in str(info.value), (message, str(info.value))
    # The same messages from the PyTorch patch path.
    with pytest.raises(RuntimeError, match="image 0 is too small"):
        ext.sample_patches([img], [img], 2, 5, 1, 0, backend="torch")


def test_wrapper_errors_and_backend_choice(ops):
    img = torch.zeros(3, 8, 8)
    with pytest.raises(ValueError, match="exactly one of scale= or size="):
        ext.imresize_fast(img)
    with pytest.raises(ValueError, match="backend must be"):
        ext.imresize_fast(img, 0.5, backend="fast")
    with pytest.raises(BackendUnavailable, match="backend='cpp' cannot run"):
        ext.imresize_fast(img.half(), 0.5, backend="cpp")
    # An automatic choice falls back quietly and says so.
    assert ext.imresize_fast(img.half(), 0.5).dtype == torch.float16
    assert ext.backend_used("imresize") == "torch"
    x = torch.rand(3, 8, 8, requires_grad=True)
    ext.imresize_fast(x, 2.0).sum().backward()  # autograd inputs take the PyTorch path
    assert x.grad is not None and ext.backend_used("imresize") == "torch"


# ---------------------------------------------------------------------------------------
# Fallbacks and the build cache
# ---------------------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import json, sys, warnings
    import torch
    warnings.simplefilter("always")
    from fastsr import ext
    with warnings.catch_warnings(record=True) as caught:
        ops = ext.load_extension()
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (2, 3, 23, 19), dtype=torch.uint8, generator=g)
    lrs = [torch.randint(0, 256, (3, 20, 21), dtype=torch.uint8, generator=g) for _ in range(3)]
    hrs = [torch.randint(0, 256, (3, 60, 63), dtype=torch.uint8, generator=g) for _ in range(3)]
    out = torch.randn(2, 3, 9, 7, generator=g) * 200
    res = {
        "down": ext.imresize_fast(img, 1 / 3), "up": ext.imresize_fast(img.float(), size=(31, 40)),
        "patches": tuple(ext.sample_patches(lrs, hrs, 3, 16, 8, seed=11)), "u8": ext.to_uint8_hwc(out),
    }
    torch.save(res, sys.argv[1])
    print(json.dumps({"loaded": ops is not None, "status": ext.extension_status(),
                      "backends": [ext.backend_used(k) for k in ("imresize", "sample_patches", "to_uint8_hwc")],
                      "warnings": [str(w.message) for w in caught]}))
""")


def _run_child(tmp_path, env_extra):
    env = {**os.environ, **env_extra, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    out_file = tmp_path / f"res_{len(list(tmp_path.iterdir()))}.pt"
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(out_file)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), torch.load(out_file)


def test_no_ext_fallback_gives_the_same_results(ops, tmp_path):
    info, fallback = _run_child(tmp_path, {"FASTSR_NO_EXT": "1"})
    assert not info["loaded"] and "FASTSR_NO_EXT" in info["status"]
    assert info["backends"] == ["torch"] * 3 and info["warnings"] == []  # asked for: no warning
    info, fast = _run_child(tmp_path, {"FASTSR_NO_EXT": "0"})
    assert info["loaded"] and info["backends"] == ["cpp"] * 3
    _assert_uint8_close(fast["down"], fallback["down"])
    torch.testing.assert_close(fast["up"], fallback["up"], atol=1e-4, rtol=1e-6)
    for a, b in zip(fast["patches"], fallback["patches"]):
        assert torch.equal(a, b)
    assert torch.equal(fast["u8"], fallback["u8"])


def test_no_compiler_warns_once_and_falls_back(tmp_path):
    env = {"CXX": str(tmp_path / "no-such-compiler"), "FASTSR_EXT_DIR": str(tmp_path / "cache"), "FASTSR_NO_EXT": ""}
    info, res = _run_child(tmp_path, env)
    assert not info["loaded"] and info["backends"] == ["torch"] * 3
    assert len(info["warnings"]) == 1
    message = info["warnings"][0]
    assert "no C++ compiler" in message and "install a C++ compiler" in message and "ninja" in message
    assert torch.equal(res["down"], imresize(torch.randint(0, 256, (2, 3, 23, 19), dtype=torch.uint8,
                                                           generator=torch.Generator().manual_seed(0)), 1 / 3))


def test_build_directory_is_keyed(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTSR_EXT_DIR", str(tmp_path))
    first = ext.build_directory()
    assert first.parent == tmp_path and first.name.startswith(ext.EXT_NAME + "-")
    assert ext.build_directory() == first
    monkeypatch.setattr(ext, "_CFLAGS", ext._CFLAGS + ("-DSOMETHING",))
    assert ext.build_directory() != first
    monkeypatch.delenv("FASTSR_EXT_DIR")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "te"))
    assert ext.build_directory().parent == tmp_path / "te" / "fastsr"


def test_sources_are_found_and_packaged():
    src = ext.source_dir()
    assert src is not None and (src / "imresize.cpp").is_file()
    setup_py = (REPO_ROOT / "setup.py").read_text()
    assert '"fastsr.csrc": "csrc"' in setup_py  # installed as fastsr/csrc, where source_dir looks first
