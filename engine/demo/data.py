"""Training data: images scaled to [-1, 1] as a (N, C, H, W) float tensor, with int64 labels (N,).

Sources: "digits" (scikit-learn's bundled 8x8 handwritten digits, 1,797 images, 10 classes, no download),
a folder of PNGs (class subfolders `root/<class>/*.png`, or a flat folder of one class), or a `.npy`
array of images (N, H, W) or (N, C, H, W) (labels from a `.npz` with `images` and `labels` arrays).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class Dataset:
    images: torch.Tensor  # (N, C, H, W) float32 in [-1, 1]
    labels: torch.Tensor  # (N,) int64 in [0, num_classes)
    num_classes: int
    class_names: list[str]

    def __len__(self):
        return len(self.images)


def _scaled(array: np.ndarray, max_value: float) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.float32) / max_value * 2 - 1)


def _dataset(images: np.ndarray, labels: np.ndarray, names: list[str], max_value: float, source: str) -> Dataset:
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"{source}: expected images of shape (N, H, W) or (N, C, H, W) with N >= 1, got "
                         f"{images.shape}")
    if images.shape[2] != images.shape[3]:
        raise ValueError(f"{source}: images must be square (DiT's latent is H = W), got {images.shape[2:]}")
    if len(labels) != len(images):
        raise ValueError(f"{source}: {len(labels)} labels for {len(images)} images")
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return Dataset(_scaled(images, max_value), labels, max(len(names), int(labels.max()) + 1), names)


@functools.lru_cache(maxsize=1)
def digits() -> Dataset:
    """The 1,797 digits (cached: the quality check and the classifier read them on every call)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return _dataset(data.images, data.target, [str(i) for i in range(10)], 16.0, "digits")


def _png_folder(root: Path) -> Dataset:
    from PIL import Image

    classes = sorted(p for p in root.iterdir() if p.is_dir())
    groups = [(c.name, sorted(c.glob("*.png"))) for c in classes] or [(root.name, sorted(root.glob("*.png")))]
    images, labels = [], []
    for label, (_, files) in enumerate(groups):
        for f in files:
            with Image.open(f) as im:
                images.append(np.asarray(im.convert("L" if im.mode in ("L", "LA", "1", "I", "I;16") else "RGB")))
            labels.append(label)
    if not images:
        raise ValueError(f"{root}: no PNG files found (expected root/<class>/*.png or root/*.png)")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"{root}: images differ in size {sorted(shapes)}; resize them to one square size first")
    stacked = np.stack(images)
    if stacked.ndim == 4:
        stacked = stacked.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    return _dataset(stacked, np.array(labels), [name for name, _ in groups], 255.0, str(root))


def load_dataset(source: str = "digits") -> Dataset:
    """"digits", a PNG folder, a `.npy` image array (uint8, or floats in [0, 1]), or a `.npz` with labels."""
    if source == "digits":
        return digits()
    path = Path(source)
    if path.is_dir():
        return _png_folder(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset {source!r}: not 'digits', a folder or an existing .npy/.npz file")
    if path.suffix == ".npz":
        with np.load(path) as f:
            if "images" not in f:
                raise ValueError(f"{path}: expected an 'images' array (and optionally 'labels')")
            images, labels = f["images"], f["labels"] if "labels" in f else np.zeros(len(f["images"]), np.int64)
    elif path.suffix == ".npy":
        images = np.load(path)
        labels = np.zeros(len(images), np.int64)
    else:
        raise ValueError(f"dataset {source!r}: expected a .npy or .npz file")
    max_value = 255.0 if images.dtype == np.uint8 else 1.0
    names = [str(i) for i in range(int(labels.max()) + 1)] if len(labels) else []
    return _dataset(images, labels, names, max_value, str(path))
