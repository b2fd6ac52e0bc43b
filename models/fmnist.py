"""Fashion-MNIST loading (raw gz IDX files, numpy only) and the fixed preprocessing.

Preprocessing used by every model in this zoo (input is 1x28x28 grayscale, NCHW):
    x = (pixel_uint8 * (1/255) - MEAN) / STD      MEAN = 0.2860, STD = 0.3530
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

DEFAULT_DATA_DIR = os.environ.get("FMNIST_DIR", "/usr/share/datasets/fashion-mnist")
MEAN = 0.2860
STD = 0.3530
SCALE = 1.0 / 255.0
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse a (gzipped) IDX file into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: bad IDX magic")
    dtype_code, ndim = data[2], data[3]
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    return arr.reshape(dims)


def load_split(split: str, data_dir: str | Path = DEFAULT_DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [N,1,28,28], labels int64 [N]) for split 'train' or 'test'."""
    img_name, lbl_name = _FILES[split]
    images = read_idx(Path(data_dir) / img_name)
    labels = read_idx(Path(data_dir) / lbl_name).astype(np.int64)
    assert images.shape[0] == labels.shape[0]
    return images[:, None, :, :].copy(), labels


def preprocess(images_u8: np.ndarray) -> np.ndarray:
    """uint8 NCHW -> float32 NCHW normalized input."""
    return ((images_u8.astype(np.float32) * np.float32(SCALE)) - np.float32(MEAN)) / np.float32(STD)
