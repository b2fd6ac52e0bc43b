"""Write the small Fashion-MNIST data files shipped with the model zoo.

Run from the repository root:

    python -m models.make_data

models/fmnist_calib.npz  (calibration set, 512 TRAINING images, seeded choice)
    input            float32 [512,1,28,28]  ALREADY PREPROCESSED, feed directly to the models
    labels           int64   [512]
    indices          int64   [512]          indices into the 60k training set
    preprocess_scale / preprocess_mean / preprocess_std   float32 scalars (for reference)
    input_format     str     "float32_preprocessed"

models/fmnist_eval.npz   (evaluation subset, 2000 TEST images, seeded choice)
    input            uint8   [2000,1,28,28]  RAW pixels; float input = (input*scale - mean) / std
    labels           int64   [2000]
    indices          int64   [2000]          indices into the 10k test set
    preprocess_scale / preprocess_mean / preprocess_std   float32 scalars
    input_format     str     "uint8_raw"
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from . import fmnist

MODELS_DIR = Path(__file__).resolve().parent
CALIB_SEED, CALIB_N = 20240501, 512
EVAL_SEED, EVAL_N = 20240502, 2000


def _pp_keys() -> dict:
    return {
        "preprocess_scale": np.float32(fmnist.SCALE),
        "preprocess_mean": np.float32(fmnist.MEAN),
        "preprocess_std": np.float32(fmnist.STD),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=fmnist.DEFAULT_DATA_DIR)
    p.add_argument("--out-dir", default=str(MODELS_DIR))
    args = p.parse_args(argv)
    out = Path(args.out_dir)

    xtr, ytr = fmnist.load_split("train", args.data_dir)
    idx = np.sort(np.random.default_rng(CALIB_SEED).choice(len(xtr), CALIB_N, replace=False)).astype(np.int64)
    calib = fmnist.preprocess(xtr[idx])
    np.savez_compressed(out / "fmnist_calib.npz", input=calib, labels=ytr[idx], indices=idx,
                        input_format=np.array("float32_preprocessed"), **_pp_keys())

    xte, yte = fmnist.load_split("test", args.data_dir)
    idx = np.sort(np.random.default_rng(EVAL_SEED).choice(len(xte), EVAL_N, replace=False)).astype(np.int64)
    np.savez_compressed(out / "fmnist_eval.npz", input=xte[idx], labels=yte[idx], indices=idx,
                        input_format=np.array("uint8_raw"), **_pp_keys())

    for name in ("fmnist_calib.npz", "fmnist_eval.npz"):
        with np.load(out / name) as z:
            desc = ", ".join(f"{k} {z[k].dtype}{list(z[k].shape)}" for k in z.files)
        print(f"{out / name}: {(out / name).stat().st_size / 1e6:.2f} MB  ({desc})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
