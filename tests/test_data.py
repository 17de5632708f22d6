"""Training data: pairing layouts, decode cache, aligned and identically augmented patches, errors."""
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastsr import data as fdata
from fastsr.data import (
    DatasetError,
    DeviceSampler,
    LoaderSource,
    PatchBatchSampler,
    PatchParams,
    SRData,
    crop_pair,
    find_pairs,
    gather_patches,
    select_images,
)
from fastsr.errors import ImageReadError
from fastsr.imresize import imresize


def write_png(path: Path, chw: torch.Tensor) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(chw.permute(1, 2, 0).numpy()).save(path)
    return path


def random_image(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def block_pair(tmp_path: Path, scale: int, n: int = 2, size=(20, 26)) -> Path:
    """hr/ and lr/ folders where HR is LR with every pixel repeated scale x scale times; returns hr/."""
    for i in range(n):
        lr = random_image(size[0] + 3 * i, size[1], seed=i)
        hr = lr.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
        write_png(tmp_path / "hr" / f"img{i}.png", hr)
        write_png(tmp_path / "lr" / f"img{i}x{scale}.png", lr)
    return tmp_path / "hr"


def photo_dir(tmp_path: Path) -> Path:
    """One real photo (scikit-image's cat, 451x300) as an HR-only folder."""
    skimage_data = pytest.importorskip("skimage.data")
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(skimage_data.chelsea()).save(folder / "chelsea.png")
    return folder


def batches(source, n):
    return [source.next() for _ in range(n)]


# ---------------------------------------------------------------------------------------
# Pairing
# ---------------------------------------------------------------------------------------


def test_div2k_layout_pairs_hr_with_lr_of_each_scale(tmp_path):
    root = tmp_path / "DIV2K"
    for name in ("0001", "0002"):
        hr = random_image(24, 36, seed=int(name))
        write_png(root / "DIV2K_train_HR" / f"{name}.png", hr)
        for s in (2, 3):
            write_png(root / "DIV2K_train_LR_bicubic" / f"X{s}" / f"{name}x{s}.png", imresize(hr, scale=1 / s))
    for given in (root, root / "DIV2K_train_HR"):
        pairs, desc = find_pairs(given, (2, 3))
        assert desc.startswith("DIV2K layout")
        assert [p.hr.name for p in pairs] == ["0001.png", "0002.png"]
        assert pairs[1].lr[3] == root / "DIV2K_train_LR_bicubic" / "X3" / "0002x3.png"
    data = SRData.load(root, (2, 3), patch_size=8)
    lr_file = np.array(Image.open(root / "DIV2K_train_LR_bicubic" / "X3" / "0001x3.png"))
    assert torch.equal(data.lr[3].image(0), torch.from_numpy(lr_file).permute(2, 0, 1))
    assert data.hr.image(1).shape == (3, 24, 36)


def test_generic_folders_pair_by_stem_with_optional_scale_suffix(tmp_path):
    for name in ("a", "b"):
        write_png(tmp_path / "hr" / f"{name}.png", random_image(16, 16, 0))
    write_png(tmp_path / "lr" / "ax2.png", random_image(8, 8, 1))
    write_png(tmp_path / "lr" / "b.png", random_image(8, 8, 2))
    write_png(tmp_path / "lr" / "unrelated.png", random_image(8, 8, 3))  # LR without HR: ignored
    pairs, desc = find_pairs(tmp_path / "hr", (2,), tmp_path / "lr")
    assert desc.startswith("generic layout")
    assert {p.hr.name: p.lr[2].name for p in pairs} == {"a.png": "ax2.png", "b.png": "b.png"}
    # Several scales need X<s> subfolders.
    with pytest.raises(DatasetError, match="X3"):
        find_pairs(tmp_path / "hr", (2, 3), tmp_path / "lr")


def test_hr_only_folder_makes_lr_with_the_evaluation_imresize(tmp_path):
    hr = random_image(23, 31, 5)  # not a multiple of 2 or 3: modcropped first
    write_png(tmp_path / "hr" / "x.png", hr)
    data = SRData.load(tmp_path / "hr", (2, 3), patch_size=4)
    for s in (2, 3):
        cropped = hr[:, : 23 - 23 % s, : 31 - 31 % s]
        expect = imresize(cropped, size=(23 // s, 31 // s))
        assert torch.equal(data.lr[s].image(0), expect)


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no image files"):
        SRData.load(tmp_path / "empty", (2,))
    with pytest.raises(DatasetError, match="does not exist"):
        SRData.load(tmp_path / "missing", (2,))


def test_missing_lr_partner_names_the_hr_file(tmp_path):
    write_png(tmp_path / "hr" / "a.png", random_image(16, 16, 0))
    write_png(tmp_path / "hr" / "lonely.png", random_image(16, 16, 0))
    write_png(tmp_path / "lr" / "a.png", random_image(8, 8, 0))
    with pytest.raises(DatasetError, match=r"lonely\.png: no LR partner for x2"):
        find_pairs(tmp_path / "hr", (2,), tmp_path / "lr")


def test_lr_of_the_wrong_size_names_the_file_and_both_sizes(tmp_path):
    write_png(tmp_path / "hr" / "a.png", random_image(16, 20, 0))
    write_png(tmp_path / "lr" / "a.png", random_image(9, 10, 0))
    with pytest.raises(DatasetError) as e:
        SRData.load(tmp_path / "hr", (2,), lr_dir=tmp_path / "lr", patch_size=4)
    msg = str(e.value)
    assert "a.png" in msg and "10x9" in msg and "20x16" in msg and "10x8" in msg


def test_unreadable_and_too_small_images_are_named(tmp_path):
    write_png(tmp_path / "hr" / "good.png", random_image(32, 32, 0))
    (tmp_path / "hr" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageReadError, match="broken.png"):
        SRData.load(tmp_path / "hr", (2,), patch_size=8)
    (tmp_path / "hr" / "broken.png").unlink()
    write_png(tmp_path / "hr" / "tiny.png", random_image(12, 40, 0))
    data = SRData.load(tmp_path / "hr", (2,), patch_size=8)  # too small: left out, named
    assert data.names == ["good.png"] and data.skipped == ["tiny.png (x2 LR 20x6)"]
    assert "1 left out, smaller than the 8x8 LR patch" in data.description
    (tmp_path / "hr" / "good.png").unlink()
    with pytest.raises(DatasetError, match=r"every training image is too small .* tiny\.png \(x2 LR 20x6\)"):
        SRData.load(tmp_path / "hr", (2,), patch_size=8)


def test_several_folders_subfolders_and_a_held_out_split(tmp_path):
    # The 291-image set's shape: one root with T91/ and BSD200/, validation held out of one.
    for i in range(3):
        write_png(tmp_path / "root" / "A" / f"a{i}.png", random_image(20, 20, i))
        write_png(tmp_path / "root" / "B" / "deep" / f"b{i}.png", random_image(20, 22, 10 + i))
    pairs, desc = find_pairs(tmp_path / "root", (2,))
    assert [p.hr.name for p in pairs] == ["a0.png", "a1.png", "a2.png", "b0.png", "b1.png", "b2.png"]
    val = select_images(tmp_path / "root" / "B", "b1, b2.png")
    assert [p.name for p in val] == ["b1.png", "b2.png"]
    data = SRData.load(f"{tmp_path / 'root' / 'A'}, {tmp_path / 'root' / 'B'}", (2,), patch_size=8, exclude=val)
    assert data.names == ["a0.png", "a1.png", "a2.png", "b0.png"] and "2 held out for validation" in data.description
    data = SRData.load(tmp_path / "root", (2,), patch_size=8, exclude=val)  # one root, recursive
    assert data.names == ["a0.png", "a1.png", "a2.png", "b0.png"]
    with pytest.raises(DatasetError, match=r"no image named 'b7'"):
        select_images(tmp_path / "root", ["b7"])
    with pytest.raises(DatasetError, match=r"nope: training folder does not exist"):
        find_pairs([tmp_path / "root" / "A", tmp_path / "nope"], (2,))


# ---------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------


def test_cache_is_used_and_invalidated_when_the_source_changes(tmp_path, monkeypatch):
    src = write_png(tmp_path / "hr" / "a.png", random_image(16, 16, 0))
    cache = tmp_path / "cache"
    first = SRData.load(tmp_path / "hr", (2,), cache_dir=cache, patch_size=4)
    assert len(list(cache.glob("*.npy"))) == 2  # the decoded HR and the made LR

    def no_decode(path):
        raise AssertionError(f"decoded {path} although it is cached")

    monkeypatch.setattr(fdata, "_decode_uint8", no_decode)
    again = SRData.load(tmp_path / "hr", (2,), cache_dir=cache, patch_size=4)
    assert torch.equal(again.hr.flat, first.hr.flat) and torch.equal(again.lr[2].flat, first.lr[2].flat)
    monkeypatch.undo()

    new = random_image(16, 18, 1)  # different content and size -> different mtime/size key
    write_png(src, new)
    changed = SRData.load(tmp_path / "hr", (2,), cache_dir=cache, patch_size=4)
    assert torch.equal(changed.hr.image(0), new)
    assert len(list(cache.glob("*.npy"))) == 2  # the stale entries were replaced, not kept


# ---------------------------------------------------------------------------------------
# Patches: crop/augment reference, batched gather, alignment
# ---------------------------------------------------------------------------------------


def test_batched_gather_equals_crop_then_augment_for_all_eight_orientations(tmp_path):
    data = SRData.load(block_pair(tmp_path, 3), (3,), lr_dir=tmp_path / "lr", patch_size=5)
    combos = list(itertools.product([False, True], repeat=3))
    b = len(combos)
    flags = torch.tensor(combos)
    p = PatchParams(3, torch.arange(b) % 2, torch.arange(b) % 4, torch.arange(b) % 7,
                    flags[:, 0], flags[:, 1], flags[:, 2])
    lr = gather_patches(data.lr[3], p, 5, 1)
    hr = gather_patches(data.hr, p, 5, 3)
    for k in range(b):
        img, s, top, left, hf, vf, tr = p.item(k)
        ref_lr, ref_hr = crop_pair(data.lr[s].image(img), data.hr.image(img), s, top, left, 5, hf, vf, tr)
        assert torch.equal(lr[k].float(), ref_lr) and torch.equal(hr[k].float(), ref_hr), combos[k]
    # augment is what it claims: a horizontal flip mirrors columns, a transpose swaps axes.
    x = torch.arange(6).view(1, 2, 3)
    assert torch.equal(fdata.augment(x, True, False, False), x.flip(-1))
    assert torch.equal(fdata.augment(x, False, False, True), x.transpose(-1, -2))


@pytest.mark.parametrize("loader", ["device", "dataloader"])
def test_augmentation_is_identical_on_lr_and_hr(tmp_path, loader):
    """HR = LR with pixels repeated: any flip/rotation mismatch breaks the block structure."""
    scale = 2
    data = SRData.load(block_pair(tmp_path, scale), (scale,), lr_dir=tmp_path / "lr", patch_size=6)
    if loader == "device":
        source = DeviceSampler(data, 8, 6, seed=3)
    else:
        source = LoaderSource(data, 8, 6, seed=3, num_workers=1)
    seen_lr = []
    for batch in batches(source, 4):
        expect = batch.lr.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
        assert torch.equal(batch.hr, expect)
        assert batch.lr.dtype == torch.float32 and batch.lr.shape == (8, 3, 6, 6)
        seen_lr.append(batch.lr)
    if loader == "dataloader":
        source.close()
    # The flags really vary: some patches come out mirrored or transposed relative to others.
    sampler = PatchBatchSampler(data, 64, 6, seed=3)
    p = sampler.params(0)
    for flag in (p.hflip, p.vflip, p.transpose):
        assert 0 < int(flag.sum()) < 64


@pytest.mark.parametrize("loader", ["device", "dataloader"])
def test_on_the_fly_lr_is_aligned_with_hr(tmp_path, loader):
    """imresize of an HR patch equals the LR patch away from the patch border (within 1 level)."""
    scale, patch = 2, 12
    data = SRData.load(photo_dir(tmp_path), (scale,), patch_size=patch)
    if loader == "device":
        source = DeviceSampler(data, 6, patch, seed=1)
    else:
        source = LoaderSource(data, 6, patch, seed=1, num_workers=0)
    for batch in batches(source, 2):
        down = imresize(batch.hr.to(torch.uint8), size=(patch, patch)).float()
        # The bicubic kernel at x2 reaches 2 LR pixels past a patch edge: compare the interior.
        inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
        diff = (down[inner] - batch.lr[inner]).abs()
        assert diff.max() <= 1, diff.max()
        # And a misaligned crop (shifted one LR pixel) would not match.
        shifted = (down[..., 2:-2, 3:-1] - batch.lr[..., 2:-2, 2:-2]).abs().mean()
        assert shifted > 1


def test_sampler_positions_restore_exactly(tmp_path):
    data = SRData.load(block_pair(tmp_path, 2, n=3), (2,), lr_dir=tmp_path / "lr", patch_size=6)
    # Device sampler: the generator state continues the stream.
    a = DeviceSampler(data, 4, 6, seed=7)
    batches(a, 3)
    state = a.state_dict()
    expect = batches(a, 2)
    b = DeviceSampler(data, 4, 6, seed=7)
    b.load_state_dict(state)
    for x, y in zip(batches(b, 2), expect):
        assert torch.equal(x.lr, y.lr) and torch.equal(x.hr, y.hr)
    # DataLoader: the position is the batch count, whatever the workers prefetched.
    c = LoaderSource(data, 4, 6, seed=7, num_workers=1)
    batches(c, 3)
    state = c.state_dict()
    expect = batches(c, 2)
    c.close()
    d = LoaderSource(data, 4, 6, seed=7, num_workers=0)
    d.load_state_dict(state)
    for x, y in zip(batches(d, 2), expect):
        assert torch.equal(x.lr, y.lr) and torch.equal(x.hr, y.hr)


def test_multiscale_batches_draw_one_scale_shared_by_ranks(tmp_path):
    for i in range(2):
        write_png(tmp_path / "hr" / f"{i}.png", random_image(40, 44, i))
    data = SRData.load(tmp_path / "hr", (2, 3, 4), patch_size=6)
    rank0 = DeviceSampler(data, 2, 6, seed=0, rank=0)
    rank1 = DeviceSampler(data, 2, 6, seed=0, rank=1)
    b0, b1 = batches(rank0, 12), batches(rank1, 12)
    assert [b.scale for b in b0] == [b.scale for b in b1]  # DDP ranks train the same branch
    assert {b.scale for b in b0} == {2, 3, 4}
    assert any(not torch.equal(x.lr, y.lr) for x, y in zip(b0, b1))  # but different patches
    for b in b0:
        assert b.hr.shape == (2, 3, 6 * b.scale, 6 * b.scale)
    loader = PatchBatchSampler(data, 2, 6, seed=0)
    assert {loader.params(i).scale for i in range(12)} == {2, 3, 4}
