#!/usr/bin/env python
"""Copy scikit-image's redistributable RGB photos into a training folder.

This is the training set of fastsr's shipped weights (DIV2K cannot be downloaded on the
build machines). Only photographs that scikit-image documents as public domain or CC0, in
color and at least 256 px on the short side, are copied, byte for byte (no re-encoding):
the synthetic test patterns, the grayscale images and the photos without a stated
license (e.g. the Middlebury motorcycle stereo pair) are left out.

    python scripts/make_train_photos.py [OUT]     (default: data/train_photos)

OUT gets a SOURCES.txt with each photo's origin and license, and a `.gitignore` holding
`*`, so the images never end up in a commit.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

# file -> (what it is, source and license as stated in skimage.data's docstrings)
PHOTOS: dict[str, tuple[str, str]] = {
    "astronaut.png": ("Eileen Collins, NASA portrait", "NASA Great Images database; public domain"),
    "coffee.png": ("coffee cup", "Rachel Michetti for Pikolo Espresso Bar; CC0"),
    "chelsea.png": ("Chelsea the cat", "Stefan van der Walt; CC0"),
    "rocket.jpg": ("DSCOVR launch on Falcon 9", "SpaceX photos; released into the public domain"),
    "hubble_deep_field.jpg": ("Hubble eXtreme Deep Field", "NASA / HubbleSite; public domain"),
    "retina.jpg": ("fundus photograph of a retina", "Mikael Haggstrom, Wikimedia Commons; CC0 1.0"),
    "ihc.png": ("immunohistochemistry micrograph (colonic glands)",
                "Center for Microscopy And Molecular Imaging; no known copyright restrictions"),
}
MIN_SIDE = 256


def skimage_data_dir() -> Path:
    try:
        import skimage
    except ImportError:
        sys.exit("make_train_photos: scikit-image is not installed (pip install scikit-image)")
    return Path(skimage.__file__).parent / "data"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default="data/train_photos", help="output folder (default %(default)s)")
    args = parser.parse_args(argv)

    from PIL import Image

    src_dir = skimage_data_dir()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text("# training photos are copied here, never committed\n*\n")
    copied, notes = [], []
    for name, (what, license_) in PHOTOS.items():
        src = src_dir / name
        if not src.is_file():
            notes.append(f"{name}: not in this scikit-image install ({src_dir}), skipped")
            continue
        with Image.open(src) as im:
            mode, (w, h) = im.mode, im.size
        if mode != "RGB" or min(w, h) < MIN_SIDE:
            notes.append(f"{name}: {mode} {w}x{h} is not an RGB photo of at least {MIN_SIDE} px, skipped")
            continue
        shutil.copyfile(src, out / name)
        copied.append(f"{name}\t{w}x{h}\t{what}\t{license_}")
    (out / "SOURCES.txt").write_text(
        "Copied from scikit-image's bundled data (skimage/data); sources and licenses as documented in "
        "skimage.data.\nfile\tsize\tcontent\tsource / license\n" + "\n".join(copied) + "\n"
    )
    for note in notes:
        print(f"make_train_photos: {note}", file=sys.stderr)
    print(f"make_train_photos: {len(copied)} photos in {out}")
    return 0 if copied else 1


if __name__ == "__main__":
    sys.exit(main())
