"""Sources the shard writer reads: indexable collections of (value, label), one global index per sample.

- ``digits``            scikit-learn's digits (train split; ``digits:test`` for the test split), float in [-1, 1]
- ``npz:<path or URL>`` arrays ``x`` (N, ...) and optional ``y`` (N,); uint8 (N, H, W, C) is stored as images
- ``imagefolder:<dir>`` ``<dir>/<class>/<image>``; classes are the sorted sub-folder names; images are
  centre-cropped and resized to ``image_size`` (ADM's crop, as in DiT's data preparation)
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from meanflow.platform.storage import filesystem, read_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class Source:
    name: str
    kind: str                     # "image" (uint8 HWC values) or "array" (float values)
    num_classes: int
    length: int
    getter: object = field(repr=False)   # index -> (value, label or None)
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.getter(index)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop: halve with a box filter while the short side is ≥ 2·size, resize bicubically so the short
    side is ``size``, then crop the centre."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top:top + size, left:left + size])


def _digits(split: str) -> Source:
    from .digits import load_digits_split
    x, y = load_digits_split(split)
    xs, ys = x.numpy(), y.numpy()
    return Source("digits", "array", 10, len(ys), lambda i: (xs[i], int(ys[i])))


def _npz(url: str) -> Source:
    with np.load(io.BytesIO(read_bytes(url)), allow_pickle=False) as data:
        if "x" not in data:
            raise ValueError(f"{url}: an npz source needs an array named 'x' (has {sorted(data.files)})")
        x = data["x"]
        y = data["y"] if "y" in data else None
    kind = "image" if x.dtype == np.uint8 and x.ndim == 4 else "array"
    num_classes = 0 if y is None else int(y.max()) + 1
    return Source(posixpath.basename(url).removesuffix(".npz"), kind, num_classes, len(x),
                  lambda i: (x[i], None if y is None else int(y[i])))


def _image_folder(url: str, image_size: int, channels: int) -> Source:
    fs, root = filesystem(url)
    files = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_SUFFIXES))
    classes = sorted({posixpath.relpath(p, root).split("/")[0] for p in files if "/" in posixpath.relpath(p, root)})
    if not files or not classes:
        raise ValueError(f"{url}: no images in class sub-folders (<dir>/<class>/<image>{IMAGE_SUFFIXES})")
    label_of = {c: k for k, c in enumerate(classes)}
    files = [p for p in files if "/" in posixpath.relpath(p, root)]

    def get(i: int):
        with fs.open(files[i], "rb") as f, Image.open(f) as im:
            im = center_crop(im.convert("L" if channels == 1 else "RGB"), image_size)
        arr = np.asarray(im)
        return arr.reshape(*arr.shape[:2], -1), label_of[posixpath.relpath(files[i], root).split("/")[0]]

    return Source(posixpath.basename(root.rstrip("/")), "image", len(classes), len(files), get, classes)


def open_source(spec: str, image_size: int = 256, channels: int = 3) -> Source:
    kind, _, arg = spec.partition(":")
    if kind == "digits":
        return _digits(arg or "train")
    if kind == "npz" and arg:
        return _npz(arg)
    if kind == "imagefolder" and arg:
        return _image_folder(arg, image_size, channels)
    raise ValueError(f"--source {spec!r}: expected digits[:train|test], npz:<path> or imagefolder:<dir>")
