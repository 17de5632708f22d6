"""Training data: paired LR/HR images decoded once, random aligned patches, two loaders.

Sources (`find_pairs`), tried in this order:
  - DIV2K layout: `ROOT/DIV2K_train_HR/0001.png` with `ROOT/DIV2K_train_LR_bicubic/X{s}/0001x{s}.png`
    (ROOT given, or the HR folder itself with the LR folder beside it);
  - a generic HR folder plus an LR folder (with `X{s}` subfolders, or flat for one scale),
    paired by file stem, the LR stem optionally ending in `x{s}` / `_x{s}`;
  - HR only: LR made here by fastsr.evaluation.make_lr (MATLAB bicubic of the modcropped uint8 HR,
    uint8 out), the same code evaluation uses, so training sees the test-time degradation.

`SRData.load` decodes everything once into uint8 (3, H, W) images held in one flat buffer per
scale (`ImageStore`), optionally backed by an on-disk `.npy` cache keyed by source path, mtime
and size. Patches: a random `patch x patch` LR crop and the aligned `scale * patch` HR crop,
with the same random horizontal flip, vertical flip and transpose (with the flips, all eight
90-degree rotations / mirrors) applied to both, returned as float32 0..255 (the model
subtracts the mean itself).

Loaders, same patch distribution and the same `PatchParams`:
  - `DeviceSampler`: the whole dataset on the training device; a batch is one gather per
    tensor through precomputed index grids (crop, flips and transpose folded into the
    indices), driven by torch.Generators whose state goes into checkpoints;
  - `LoaderSource`: a torch DataLoader with workers; the batch sampler draws each batch's
    parameters from a generator seeded by (seed, rank, batch index), so its position is a
    single integer and restores exactly whatever the number of workers.
MDSR: every batch draws one scale (the same on every DDP rank).
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from fastsr.errors import FastSRError

__all__ = [
    "Batch", "DatasetError", "DeviceSampler", "ImagePair", "ImageStore", "LoaderSource", "PatchDataset",
    "PatchBatchSampler", "PatchParams", "SRData", "augment", "crop_pair", "derive_seed", "draw_patch_params",
    "find_pairs", "gather_patches", "select_images", "split_folders",
]

Tensor = torch.Tensor

# Bump when the on-the-fly degradation changes, so cached LR images are rebuilt.
_LR_RECIPE = "imresize-matlab-bicubic-v1"


class DatasetError(FastSRError):
    """The training data cannot be used: empty folder, missing partner, wrong size, too small."""


# ---------------------------------------------------------------------------------------
# Finding the files
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImagePair:
    """One training image: the HR file and, per scale, its LR file (None: made on the fly)."""

    hr: Path
    lr: dict[int, Path | None]


def _images_in(folder: Path) -> list[Path]:
    """Every image file in `folder` and its subfolders, sorted by path (T91/ and BSD200/
    under one training root is how SR training sets come)."""
    from fastsr.imageio import IMAGE_EXTENSIONS, is_image_name

    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder")
    found = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_name(p))
    if not found:
        raise DatasetError(f"{folder}: no image files in this folder or its subfolders ({' '.join(IMAGE_EXTENSIONS)})")
    return found


def split_folders(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Folder list of a config value: one path, a comma-separated string, or a sequence."""
    if isinstance(spec, (str, os.PathLike)):
        parts = [p.strip() for p in str(spec).split(",")]
    else:
        parts = [str(p).strip() for p in spec]
    return [Path(p) for p in parts if p]


def select_images(folder: str | os.PathLike, names: str | Sequence[str]) -> list[Path]:
    """The images of `folder` (searched recursively) named in `names` (file names or stems;
    a sequence or a comma-separated string), in the order given. Raises DatasetError naming
    a name that matches no file, or several."""
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    files = _images_in(Path(folder))
    out = []
    for name in wanted:
        hits = [p for p in files if name in (p.name, p.stem)]
        if len(hits) != 1:
            raise DatasetError(f"{folder}: {'no image' if not hits else 'several images'} named {name!r}"
                               + (f" ({', '.join(map(str, hits))})" if hits else ""))
        out.append(hits[0])
    return out


def _div2k_dirs(root: Path) -> tuple[Path, Path | None] | None:
    """(HR folder, LR-bicubic folder or None) when `root` is a DIV2K root or HR folder."""
    for split in ("train", "valid"):
        if (root / f"DIV2K_{split}_HR").is_dir():
            lr = root / f"DIV2K_{split}_LR_bicubic"
            return root / f"DIV2K_{split}_HR", (lr if lr.is_dir() else None)
    m = re.fullmatch(r"DIV2K_(train|valid)_HR", root.name)
    if m:
        lr = root.parent / f"DIV2K_{m.group(1)}_LR_bicubic"
        return root, (lr if lr.is_dir() else None)
    return None


def _lr_folder(lr_root: Path, scale: int, n_scales: int) -> Path:
    for name in (f"X{scale}", f"x{scale}"):
        if (lr_root / name).is_dir():
            return lr_root / name
    if n_scales > 1:
        raise DatasetError(
            f"{lr_root}: with several scales the LR folder needs one subfolder per scale (X2, X3, X4); "
            f"X{scale} is missing"
        )
    return lr_root


def _pair_by_stem(hr_files: list[Path], lr_dir: Path, scale: int) -> dict[Path, Path]:
    lr_files = _images_in(lr_dir)
    by_stem: dict[str, list[Path]] = {}
    for p in lr_files:
        by_stem.setdefault(p.stem, []).append(p)
    out: dict[Path, Path] = {}
    for hr in hr_files:
        names = (hr.stem, f"{hr.stem}x{scale}", f"{hr.stem}_x{scale}")
        matches = [p for n in names for p in by_stem.get(n, [])]
        if not matches:
            raise DatasetError(
                f"{hr}: no LR partner for x{scale} in {lr_dir} (looked for {names[0]}.*, {names[1]}.* and {names[2]}.*)"
            )
        if len(matches) > 1:
            raise DatasetError(f"{hr}: several LR partners for x{scale}: {', '.join(str(m) for m in matches)}")
        out[hr] = matches[0]
    return out


def find_pairs(train_dir: str | os.PathLike | Sequence[str | os.PathLike], scales: Sequence[int],
               lr_dir: str | os.PathLike | None = None,
               exclude: Sequence[str | os.PathLike] = ()) -> tuple[list[ImagePair], str]:
    """Pair the HR images of `train_dir` with their LR images for every scale.

    train_dir: a folder (searched recursively), or several (a sequence or a comma-separated
    string; HR only, LR made on the fly). exclude: image files left out (a validation split
    held out of the same folders).
    Returns (pairs sorted by HR path, a one-line description of the layout found).
    Raises DatasetError for a missing or empty folder, or an HR image without its LR partner.
    """
    folders = split_folders(train_dir)
    if not folders:
        raise DatasetError("no training folder given")
    for folder in folders:
        if not folder.exists():
            raise DatasetError(f"{folder}: training folder does not exist")
    held_out = {Path(p).resolve() for p in exclude}
    scales = tuple(int(s) for s in scales)
    layout = "generic"
    hr_dirs, lr_root = folders, (Path(lr_dir) if lr_dir else None)
    if len(folders) > 1 and lr_root is not None:
        raise DatasetError("several training folders take no LR folder (their LR is made on the fly)")
    div2k = _div2k_dirs(folders[0]) if len(folders) == 1 else None
    if div2k is not None and lr_root is None:
        (hr_dir, lr_root), layout = div2k, "DIV2K"
        hr_dirs = [hr_dir]
    if lr_root is not None and not lr_root.is_dir():
        raise DatasetError(f"{lr_root}: LR folder does not exist")
    where = ", ".join(map(str, hr_dirs))
    all_hr = [p for d in hr_dirs for p in _images_in(d)]
    hr_files = [p for p in all_hr if p.resolve() not in held_out]
    if not hr_files:
        raise DatasetError(f"{where}: every image is held out for validation")
    held = f" ({len(all_hr) - len(hr_files)} held out for validation)" if len(hr_files) < len(all_hr) else ""
    lr_maps: dict[int, dict[Path, Path]] = {}
    if lr_root is not None:
        for s in scales:
            lr_maps[s] = _pair_by_stem(hr_files, _lr_folder(lr_root, s, len(scales)), s)
    pairs = [ImagePair(hr, {s: (lr_maps[s][hr] if s in lr_maps else None) for s in scales}) for hr in hr_files]
    scale_text = "/".join(f"x{s}" for s in scales)
    source = "made on the fly (MATLAB bicubic)" if lr_root is None else f"from {lr_root}"
    desc = f"{layout} layout: {len(pairs)} HR images in {where}{held}, LR {scale_text} {source}"
    return pairs, desc


# ---------------------------------------------------------------------------------------
# Decoding (with an optional on-disk cache)
# ---------------------------------------------------------------------------------------


def _source_key(path: Path) -> tuple[str, str]:
    """(hash of the resolved path, hash of its mtime and size): the cache file's name parts."""
    st = path.stat()
    where = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:20]
    when = hashlib.sha1(f"{st.st_mtime_ns}:{st.st_size}".encode()).hexdigest()[:12]
    return where, when


def _cache_file(cache_dir: Path, source: Path, variant: str) -> tuple[Path, str]:
    where, when = _source_key(source)
    stem = f"{where}-{hashlib.sha1(variant.encode()).hexdigest()[:8]}"
    return cache_dir / f"{stem}-{when}.npy", stem


def _cache_load(file: Path) -> Tensor | None:
    try:
        arr = np.load(file, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None  # missing or damaged: rebuilt by the caller
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[0] != 3:
        return None
    return torch.from_numpy(np.ascontiguousarray(arr))


def _cache_store(file: Path, stem: str, img: Tensor) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    # Entries for an older version of the same source are stale: drop them.
    for old in file.parent.glob(f"{stem}-*.npy"):
        if old != file:
            old.unlink(missing_ok=True)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, img.numpy(), allow_pickle=False)
    # Atomic: several DDP ranks may fill the same cache at once.
    os.replace(tmp, file)


def _cached(cache_dir: Path | None, source: Path, variant: str, make) -> Tensor:
    if cache_dir is None:
        return make()
    file, stem = _cache_file(cache_dir, source, variant)
    img = _cache_load(file) if file.exists() else None
    if img is None:
        img = make()
        _cache_store(file, stem, img)
    return img


def _decode_uint8(path: Path) -> Tensor:
    """(3, H, W) uint8 RGB of an image file (alpha dropped, gray expanded, 16-bit rounded)."""
    from fastsr.imageio import read_image

    rgb = read_image(path).rgb  # raises ImageReadError naming the file
    return rgb.round().clamp_(0, 255).to(torch.uint8).contiguous()


# ---------------------------------------------------------------------------------------
# In-memory storage
# ---------------------------------------------------------------------------------------


class ImageStore:
    """Many uint8 (3, H, W) images of different sizes in one flat buffer.

    flat: 1-D uint8; image i is `flat[offsets[i] : offsets[i] + 3 * H_i * W_i]` in CHW order.
    offsets, heights, widths: (N,) int64 on the same device as flat. One buffer (instead of
    a padded batch) wastes nothing on mixed portrait/landscape sizes and lets a whole batch
    of crops be a single gather.
    """

    def __init__(self, flat: Tensor, offsets: Tensor, heights: Tensor, widths: Tensor):
        self.flat, self.offsets, self.heights, self.widths = flat, offsets, heights, widths

    @classmethod
    def from_images(cls, images: list[Tensor]) -> "ImageStore":
        """Pack (3, H, W) uint8 CPU images; `images` is emptied as they are copied (peak memory ~1x)."""
        sizes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
        counts = [3 * h * w for h, w in sizes]
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if counts else np.zeros(0, np.int64)
        flat = torch.empty(int(sum(counts)), dtype=torch.uint8)
        for i in range(len(images)):
            flat[offsets[i]: offsets[i] + counts[i]] = images[i].reshape(-1)
            images[i] = None  # free the decoded copy now that it lives in flat
        images.clear()
        as_long = lambda v: torch.tensor(v, dtype=torch.int64)
        return cls(flat, torch.from_numpy(offsets), as_long([h for h, _ in sizes]), as_long([w for _, w in sizes]))

    def __len__(self) -> int:
        return int(self.offsets.numel())

    def image(self, i: int) -> Tensor:
        """Image i as a (3, H, W) uint8 view of the buffer."""
        h, w, off = int(self.heights[i]), int(self.widths[i]), int(self.offsets[i])
        return self.flat[off: off + 3 * h * w].view(3, h, w)

    def to(self, device: torch.device | str) -> "ImageStore":
        return ImageStore(*(t.to(device) for t in (self.flat, self.offsets, self.heights, self.widths)))

    @property
    def nbytes(self) -> int:
        return int(self.flat.numel())


@dataclass
class SRData:
    """Decoded training set. hr: the HR images; lr[s]: the LR images for scale s (same order).

    crop_h[s] / crop_w[s]: (N,) int64, the LR extent where an LR crop still has its whole HR
    partner inside the HR image (min(LR size, HR size // s)).
    """

    hr: ImageStore
    lr: dict[int, ImageStore]
    crop_h: dict[int, Tensor]
    crop_w: dict[int, Tensor]
    names: list[str]
    description: str
    skipped: list[str] = field(default_factory=list)  # "name (x2 LR 39x39)": left out, too small

    @property
    def scales(self) -> tuple[int, ...]:
        return tuple(self.lr)

    def __len__(self) -> int:
        return len(self.hr)

    @classmethod
    def load(cls, train_dir: str | os.PathLike | Sequence[str | os.PathLike], scales: Sequence[int], *,
             lr_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
             patch_size: int = 48, threads: int = 4, progress: bool = False,
             exclude: Sequence[str | os.PathLike] = ()) -> "SRData":
        """Find, decode (or read from the cache), check and pack the training images.

        Images whose LR is smaller than `patch_size` at some scale are left out and named in
        `skipped` (T91 holds a few: t20's x2 LR is 39x39); `exclude` leaves files out (a
        held-out validation split). Raises DatasetError / ImageReadError naming the offending
        file: unreadable image, LR size not HR size / s, or every image too small.
        """
        pairs, description = find_pairs(train_dir, scales, lr_dir, exclude)
        from fastsr.evaluation import make_lr  # the evaluation's own degradation

        cache = Path(cache_dir) if cache_dir else None
        scales = tuple(int(s) for s in scales)

        def load_one(pair: ImagePair) -> tuple[Tensor, dict[int, Tensor]]:
            hr = _cached(cache, pair.hr, "rgb8", lambda: _decode_uint8(pair.hr))
            lrs = {}
            for s in scales:
                src = pair.lr[s]
                if src is None:
                    lrs[s] = _cached(cache, pair.hr, f"lr-x{s}-{_LR_RECIPE}", lambda s=s: make_lr(hr, s))
                else:
                    lrs[s] = _cached(cache, src, "rgb8", lambda src=src: _decode_uint8(src))
                    _check_lr_size(pair.hr, hr, src, lrs[s], s)
            return hr, lrs

        from tqdm import tqdm

        # Pillow and the imresize matmuls release the GIL: threads decode in parallel.
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            results = list(tqdm(pool.map(load_one, pairs), total=len(pairs), desc="decoding training images",
                                unit="img", leave=False, file=sys.stderr,
                                # None: only on a terminal (a piped log gets no bar to glue lines to)
                                disable=None if progress else True))
        # The usable crop per scale: the LR size, capped by HR // s (a DIV2K LR may be larger).
        crops = [{s: (min(int(lrs[s].shape[1]), int(hr.shape[1]) // s), min(int(lrs[s].shape[2]), int(hr.shape[2]) // s))
                  for s in scales} for hr, lrs in results]
        keep = [i for i, c in enumerate(crops) if all(min(hw) >= patch_size for hw in c.values())]
        skipped = []
        for i in sorted(set(range(len(pairs))) - set(keep)):
            s, (h, w) = min(crops[i].items(), key=lambda kv: min(kv[1]))
            skipped.append(f"{pairs[i].hr.name} (x{s} LR {w}x{h})")
        if not keep:
            raise DatasetError(
                f"every training image is too small for the {patch_size}x{patch_size} LR patch "
                f"(e.g. {skipped[0]}): lower patch_size"
            )
        if skipped:
            description += f"; {len(skipped)} left out, smaller than the {patch_size}x{patch_size} LR patch"
        hr_imgs = [results[i][0] for i in keep]
        lr_imgs = {s: [results[i][1][s] for i in keep] for s in scales}
        crop_h = {s: torch.tensor([crops[i][s][0] for i in keep], dtype=torch.int64) for s in scales}
        crop_w = {s: torch.tensor([crops[i][s][1] for i in keep], dtype=torch.int64) for s in scales}
        del results
        lr_stores = {s: ImageStore.from_images(lr_imgs[s]) for s in scales}
        return cls(ImageStore.from_images(hr_imgs), lr_stores, crop_h, crop_w, [pairs[i].hr.name for i in keep],
                   description, skipped)

    def to(self, device: torch.device | str) -> "SRData":
        return SRData(self.hr.to(device), {s: st.to(device) for s, st in self.lr.items()},
                      {s: t.to(device) for s, t in self.crop_h.items()},
                      {s: t.to(device) for s, t in self.crop_w.items()}, self.names, self.description,
                      self.skipped)


def _check_lr_size(hr_path: Path, hr: Tensor, lr_path: Path, lr: Tensor, scale: int) -> None:
    H, W = int(hr.shape[1]), int(hr.shape[2])
    h, w = int(lr.shape[1]), int(lr.shape[2])
    # MATLAB's imresize(HR, 1/s) gives ceil(H / s); modcrop-first pipelines give floor.
    ok_h = h in (H // scale, -(-H // scale))
    ok_w = w in (W // scale, -(-W // scale))
    if not (ok_h and ok_w):
        raise DatasetError(
            f"{lr_path}: LR is {w}x{h} but its HR {hr_path.name} is {W}x{H}, which at x{scale} needs "
            f"{W // scale}x{H // scale}"
        )


# ---------------------------------------------------------------------------------------
# Patch parameters, cropping and augmentation
# ---------------------------------------------------------------------------------------


@dataclass
class PatchParams:
    """One batch of patch draws; all (B,) tensors. top/left: LR pixel of the crop's corner."""

    scale: int
    img: Tensor
    top: Tensor
    left: Tensor
    hflip: Tensor
    vflip: Tensor
    transpose: Tensor

    def item(self, k: int) -> tuple[int, int, int, int, bool, bool, bool]:
        """Sample k as plain values: (img, scale, top, left, hflip, vflip, transpose)."""
        return (int(self.img[k]), self.scale, int(self.top[k]), int(self.left[k]),
                bool(self.hflip[k]), bool(self.vflip[k]), bool(self.transpose[k]))


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any values (stable across processes, unlike hash())."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def draw_patch_params(gen: torch.Generator, crop_h: Tensor, crop_w: Tensor, scale: int, batch: int,
                      patch: int) -> PatchParams:
    """Uniform image, uniform crop position, independent fair flips/transpose, from `gen`.

    crop_h / crop_w: (N,) int64 valid LR extents (SRData.crop_h[scale]) on gen's device.
    """
    dev = crop_h.device
    img = torch.randint(int(crop_h.numel()), (batch,), generator=gen, device=dev)
    pos = torch.rand(2, batch, generator=gen, device=dev, dtype=torch.float64)
    top = (pos[0] * (crop_h[img] - patch + 1)).long()
    left = (pos[1] * (crop_w[img] - patch + 1)).long()
    flags = torch.randint(2, (3, batch), generator=gen, device=dev).bool()
    return PatchParams(scale, img, top, left, flags[0], flags[1], flags[2])


def augment(img: Tensor, hflip: bool, vflip: bool, transpose: bool) -> Tensor:
    """(..., H, W): horizontal flip, then vertical flip, then transpose (the official order)."""
    if hflip:
        img = img.flip(-1)
    if vflip:
        img = img.flip(-2)
    if transpose:
        img = img.transpose(-2, -1)
    return img


def crop_pair(lr: Tensor, hr: Tensor, scale: int, top: int, left: int, patch: int,
              hflip: bool = False, vflip: bool = False, transpose: bool = False) -> tuple[Tensor, Tensor]:
    """One aligned, augmented pair: lr (3, P, P) and hr (3, sP, sP), float32 0..255.

    lr, hr: (3, h, w) / (3, H, W) uint8 images. The reference for `gather_patches`.
    """
    lr_p = lr[:, top: top + patch, left: left + patch]
    hr_p = hr[:, scale * top: scale * (top + patch), scale * left: scale * (left + patch)]
    return (augment(lr_p, hflip, vflip, transpose).float().contiguous(),
            augment(hr_p, hflip, vflip, transpose).float().contiguous())


def gather_patches(store: ImageStore, p: PatchParams, patch: int, factor: int) -> Tensor:
    """Crop + augment a whole batch in one gather: (B, 3, factor*patch, factor*patch) uint8.

    factor 1 reads LR crops at (top, left); factor s reads the aligned HR crops at (s*top,
    s*left). Output pixel (i, j) reads source (a, b) = (j, i) if transposed else (i, j),
    then a -> Q-1-a for a vertical flip and b -> Q-1-b for a horizontal one: the same
    result as `augment` on the crop, since flipping before transposing is what augment does.
    """
    q = factor * patch
    b = p.img.numel()
    dev = store.flat.device
    ar = torch.arange(q, device=dev)
    i, j = ar.view(1, q, 1).expand(b, q, q), ar.view(1, 1, q).expand(b, q, q)
    t = p.transpose.view(b, 1, 1)
    rows, cols = torch.where(t, j, i), torch.where(t, i, j)
    rows = torch.where(p.vflip.view(b, 1, 1), q - 1 - rows, rows)
    cols = torch.where(p.hflip.view(b, 1, 1), q - 1 - cols, cols)
    h, w, off = store.heights[p.img], store.widths[p.img], store.offsets[p.img]
    pix = (factor * p.top).view(b, 1, 1) + rows
    pix = pix * w.view(b, 1, 1) + (factor * p.left).view(b, 1, 1) + cols
    plane = (h * w).view(b, 1, 1, 1) * torch.arange(3, device=dev).view(1, 3, 1, 1)
    return store.flat[off.view(b, 1, 1, 1) + plane + pix.unsqueeze(1)]


# ---------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------


@dataclass
class Batch:
    """lr (B, 3, P, P) and hr (B, 3, sP, sP) float32 0..255 on the training device; one scale."""

    lr: Tensor
    hr: Tensor
    scale: int


def _draw_scale(scales: tuple[int, ...], gen: torch.Generator) -> int:
    if len(scales) == 1:
        return scales[0]  # no draw: a single-scale run consumes nothing from the scale stream
    return scales[int(torch.randint(len(scales), (1,), generator=gen))]


class DeviceSampler:
    """Batches sampled on the device that holds the whole decoded dataset.

    The patch generator lives on that device and is seeded per rank (DDP ranks draw
    different patches); the scale generator is a CPU one seeded without the rank, so every
    rank trains the same MDSR branch in a step. Both states are in `state_dict()`.
    """

    def __init__(self, data: SRData, batch_size: int, patch_size: int, *, seed: int = 0, rank: int = 0,
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.data = data.to(self.device)
        self.scales = data.scales
        self.batch_size, self.patch_size = int(batch_size), int(patch_size)
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(derive_seed(seed, "patches", rank))
        self.scale_gen = torch.Generator().manual_seed(derive_seed(seed, "scales"))
        self.batches = 0

    def draw(self) -> PatchParams:
        scale = _draw_scale(self.scales, self.scale_gen)
        return draw_patch_params(self.gen, self.data.crop_h[scale], self.data.crop_w[scale], scale,
                                 self.batch_size, self.patch_size)

    def gather(self, p: PatchParams) -> Batch:
        lr = gather_patches(self.data.lr[p.scale], p, self.patch_size, 1)
        hr = gather_patches(self.data.hr, p, self.patch_size, p.scale)
        return Batch(lr.float(), hr.float(), p.scale)

    def next(self) -> Batch:
        batch = self.gather(self.draw())
        self.batches += 1
        return batch

    def state_dict(self) -> dict:
        return {"kind": "device", "patch_rng": self.gen.get_state(), "scale_rng": self.scale_gen.get_state(),
                "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "device":
            raise DatasetError(f"sampler state is for the {state.get('kind')!r} loader, not 'device'")
        self.gen.set_state(state["patch_rng"])
        self.scale_gen.set_state(state["scale_rng"])
        self.batches = int(state["batches"])


class PatchBatchSampler(torch.utils.data.Sampler):
    """Infinite batch sampler for the DataLoader path: yields lists of patch descriptors.

    Batch b is drawn from generators seeded by (seed, rank, b) (scale: (seed, b)), so it
    depends only on its index: the position to restore is the number of batches consumed,
    however many batches the workers had prefetched.
    """

    def __init__(self, data: SRData, batch_size: int, patch_size: int, *, seed: int = 0, rank: int = 0,
                 start: int = 0):
        self.crop_h, self.crop_w = data.crop_h, data.crop_w
        self.scales = data.scales
        self.batch_size, self.patch_size = int(batch_size), int(patch_size)
        self.seed, self.rank, self.start = seed, rank, int(start)

    def params(self, b: int) -> PatchParams:
        scale = _draw_scale(self.scales, torch.Generator().manual_seed(derive_seed(self.seed, "scales", b)))
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "patches", self.rank, b))
        return draw_patch_params(gen, self.crop_h[scale], self.crop_w[scale], scale, self.batch_size, self.patch_size)

    def __iter__(self) -> Iterator[list[tuple]]:
        b = self.start
        while True:
            p = self.params(b)
            yield [p.item(k) for k in range(self.batch_size)]
            b += 1


class PatchDataset(torch.utils.data.Dataset):
    """Map-style dataset over patch descriptors (img, scale, top, left, hflip, vflip, transpose).

    Returns (lr (3, P, P), hr (3, sP, sP) float32 0..255, scale). All randomness is in the
    descriptor, drawn in the main process, so workers need no RNG of their own.
    """

    def __init__(self, data: SRData, patch_size: int):
        self.data, self.patch_size = data, int(patch_size)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, desc: tuple) -> tuple[Tensor, Tensor, int]:
        img, scale, top, left, hflip, vflip, transpose = desc
        lr, hr = crop_pair(self.data.lr[scale].image(img), self.data.hr.image(img), scale, top, left,
                           self.patch_size, hflip, vflip, transpose)
        return lr, hr, scale


def _seed_worker(worker_id: int) -> None:
    # Workers draw nothing themselves; seeding the global RNGs anyway keeps any
    # future randomness in a worker reproducible.
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class LoaderSource:
    """DataLoader-driven batches with a restorable position (`state_dict()["batches"]`)."""

    def __init__(self, data: SRData, batch_size: int, patch_size: int, *, seed: int = 0, rank: int = 0,
                 device: torch.device | str = "cpu", num_workers: int = 2):
        self.data, self.batch_size, self.patch_size = data, batch_size, patch_size
        self.seed, self.rank, self.device = seed, rank, torch.device(device)
        self.num_workers = int(num_workers)
        self.batches = 0
        self._it: Iterator | None = None

    def _start(self) -> Iterator:
        sampler = PatchBatchSampler(self.data, self.batch_size, self.patch_size, seed=self.seed, rank=self.rank,
                                    start=self.batches)
        loader = torch.utils.data.DataLoader(
            PatchDataset(self.data, self.patch_size), batch_sampler=sampler, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", worker_init_fn=_seed_worker,
            generator=torch.Generator().manual_seed(derive_seed(self.seed, "workers", self.rank, self.batches)),
            prefetch_factor=4 if self.num_workers > 0 else None,
        )
        return iter(loader)

    def next(self) -> Batch:
        if self._it is None:
            self._it = self._start()
        lr, hr, scale = next(self._it)
        self.batches += 1
        nb = self.device.type == "cuda"
        return Batch(lr.to(self.device, non_blocking=nb), hr.to(self.device, non_blocking=nb), int(scale[0]))

    def state_dict(self) -> dict:
        return {"kind": "dataloader", "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "dataloader":
            raise DatasetError(f"sampler state is for the {state.get('kind')!r} loader, not 'dataloader'")
        if self._it is not None:
            raise RuntimeError("load_state_dict must come before the first batch")
        self.batches = int(state["batches"])

    def close(self) -> None:
        # Drops the iterator, which shuts its worker processes down.
        self._it = None
