"""The packed training file of the GPU deblur recipe: every sharp EM image in ONE compressed .npz.

`python -m models.deblur.pack_data --out .gpu/em_train.npz` reads ../shared/data once, here, so that a
GPU machine without ../shared trains from this file alone (`models.deblur.train --data`).

What goes in (sharp images only; blur and noise are synthesised during training):
- isbi2012-train images 0-21 as split "train" and 22-25 as split "val" (`models.blur_synth.SPLITS`);
  the test images 26-29 are never packed, so the benchmark's images stay unseen;
- every em-corpus source's top-level PNGs (the `soft/` folders are soft at the source, never targets),
  split by source: VAL_SOURCES are "val", the others "train" (neighbouring crops of one field must not
  straddle the split).
Pixels are kept as stored (uint8 or uint16, unchanged values). To keep the file <= MAX_BYTES (it
travels with the working tree to the GPU machine), em-corpus images larger than MAX_SIDE px on a side are
centre-cropped to MAX_SIDE; nothing is skipped. The writer fails if the file still exceeds MAX_BYTES.

Format (np.load(..., allow_pickle=False)): `image_0000`, `image_0001`, ... 2-D uint8/uint16 arrays and
string arrays `name`, `source`, `split` (one entry per image), `format_version` (int).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.pixels import centre_crop

FORMAT_VERSION = 1
MAX_BYTES = 14_000_000
MAX_SIDE = 480
ISBI_SOURCE = "isbi2012"
VAL_SOURCES: tuple[str, ...] = ("syconn_sbem_j0126",)


@dataclass(frozen=True)
class PackedImage:
    """One sharp training image: pixels uint8/uint16 (H, W), its source folder and split."""

    name: str
    source: str
    split: str
    pixels: np.ndarray


def collect_images(data_dir: Path, max_side: int = MAX_SIDE) -> list[PackedImage]:
    """Every image to pack from `data_dir` (../shared/data), in a fixed order (sorted paths)."""
    from models.blur_synth import SPLITS, load_image

    images = [
        PackedImage(f"{i}.png", ISBI_SOURCE, split, load_image(data_dir / "isbi2012-train" / f"{i}.png"))
        for split in ("train", "val")
        for i in SPLITS[split]
    ]
    for folder in sorted(p for p in (data_dir / "em-corpus").iterdir() if p.is_dir()):
        split = "val" if folder.name in VAL_SOURCES else "train"
        for path in sorted(folder.glob("*.png")):  # top level only: soft/ is never a target
            if path.name == "contact.png":  # the folder's contact sheet, not data
                continue
            pixels = centre_crop(load_image(path), max_side)
            images.append(PackedImage(path.name, folder.name, split, np.ascontiguousarray(pixels)))
    return images


def write_packed(images: list[PackedImage], out: Path, max_bytes: int = MAX_BYTES) -> int:
    """Write the .npz (atomically); returns its size in bytes; raises if it exceeds max_bytes."""
    arrays: dict[str, np.ndarray] = {f"image_{i:04d}": image.pixels for i, image in enumerate(images)}
    arrays["name"] = np.array([image.name for image in images])
    arrays["source"] = np.array([image.source for image in images])
    arrays["split"] = np.array([image.split for image in images])
    arrays["format_version"] = np.array(FORMAT_VERSION)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial.npz")
    np.savez_compressed(partial, **arrays)
    size = partial.stat().st_size
    if size > max_bytes:
        partial.unlink()
        raise RuntimeError(f"{out}: packed file would be {size} bytes > {max_bytes}; lower --max-side")
    partial.replace(out)
    return size


def load_packed(path: Path) -> list[PackedImage]:
    """Read a file written by `write_packed`."""
    with np.load(path, allow_pickle=False) as packed:
        version = int(packed["format_version"])
        if version != FORMAT_VERSION:
            raise ValueError(f"{path}: packed format {version}, this code reads {FORMAT_VERSION}; re-pack it")
        names, sources, splits = packed["name"], packed["source"], packed["split"]
        return [
            PackedImage(str(names[i]), str(sources[i]), str(splits[i]), packed[f"image_{i:04d}"])
            for i in range(len(names))
        ]


def summary(images: list[PackedImage]) -> dict[str, dict[str, int]]:
    """Images and megapixels per (split, source): what the file holds, for the log."""
    table: dict[str, dict[str, int]] = {}
    for image in images:
        row = table.setdefault(f"{image.split}/{image.source}", {"images": 0, "pixels": 0})
        row["images"] += 1
        row["pixels"] += int(image.pixels.size)
    return table


def main() -> None:
    from models.blur_synth import DATA_DIR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".gpu/em_train.npz"))
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR.parent, help="../shared/data")
    parser.add_argument("--max-side", type=int, default=MAX_SIDE)
    args = parser.parse_args()
    images = collect_images(args.data_dir, args.max_side)
    size = write_packed(images, args.out)
    print(
        json.dumps({"out": str(args.out), "bytes": size, "images": len(images), "by_source": summary(images)}, indent=1)
    )


if __name__ == "__main__":
    main()
