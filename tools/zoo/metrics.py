"""Task metrics for the zoo: CTC char accuracy, DB-box hmean, top-1, SQNR, PicoDet box F1.

Pure numpy (no cv2, scipy, pyclipper, shapely): boxes are axis-aligned, which the rendered
data is.
"""

from __future__ import annotations

import math

import numpy as np


def sqnr(ref, cand) -> float:
    """10 log10(sum ref^2 / sum (ref - cand)^2) in dB over all elements (inf if equal)."""
    ref = np.asarray(ref, np.float64)
    cand = np.asarray(cand, np.float64)
    noise = float(np.sum((ref - cand) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.sum(ref ** 2)) / noise)


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == labels))


# --- recognition ---------------------------------------------------------------------------

def ctc_greedy(probs: np.ndarray, characters: list[str]) -> list[str]:
    """rapidocr CTCLabelDecode: argmax per step, collapse repeats, drop index 0 (blank).
    `characters` is the model's `character` metadata with "blank" inserted first and " "
    appended last, as rapidocr's get_character does."""
    out = []
    for idx in np.argmax(probs, axis=2):
        keep = np.ones(len(idx), bool)
        keep[1:] = idx[1:] != idx[:-1]
        keep &= idx != 0
        out.append("".join(characters[i] for i in idx[keep]))
    return out


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_accuracy(pred: list[str], truth: list[str]) -> float:
    """1 - (sum of Levenshtein distances) / (sum of ground-truth lengths), floored at 0."""
    errors = sum(edit_distance(p, t) for p, t in zip(pred, truth))
    return max(0.0, 1.0 - errors / max(1, sum(len(t) for t in truth)))


# --- DB text detection ---------------------------------------------------------------------

def _components(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (x0, y0, x1, y1 inclusive) of 8-connected components, via row runs and
    union-find."""
    runs = []  # (row, start, end inclusive)
    for y in range(mask.shape[0]):
        row = np.flatnonzero(np.diff(np.concatenate(([0], mask[y].astype(np.int8), [0]))))
        for s, e in zip(row[::2], row[1::2] - 1):
            runs.append((y, int(s), int(e)))
    parent = list(range(len(runs)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    by_row: dict[int, list[int]] = {}
    for k, (y, s, e) in enumerate(runs):
        by_row.setdefault(y, []).append(k)
    for k, (y, s, e) in enumerate(runs):
        for j in by_row.get(y - 1, ()):
            _, s2, e2 = runs[j]
            if s2 <= e + 1 and e2 >= s - 1:
                a, b = find(k), find(j)
                if a != b:
                    parent[a] = b
    boxes: dict[int, list[int]] = {}
    for k, (y, s, e) in enumerate(runs):
        r = find(k)
        b = boxes.setdefault(r, [s, y, e, y])
        b[0], b[1], b[2], b[3] = min(b[0], s), min(b[1], y), max(b[2], e), max(b[3], y)
    return [tuple(b) for b in boxes.values()]


def db_boxes(prob: np.ndarray, thresh: float = 0.3, box_thresh: float = 0.5,
             unclip_ratio: float = 1.6, dilation: bool = True) -> np.ndarray:
    """rapidocr DBPostProcess with its config (thresh 0.3, box_thresh 0.5, unclip_ratio 1.6,
    use_dilation with a 2x2 kernel, score_mode fast, min_size 3) on axis-aligned boxes:
    binarize, connected components, mean probability inside the box >= box_thresh, expand by
    area * unclip_ratio / perimeter. Returns [M, 4] boxes x0, y0, x1, y1 (exclusive)."""
    mask = prob > thresh
    if dilation:  # cv2.dilate with a 2x2 kernel anchored at its centre (1, 1)
        d = mask.copy()
        d[:, :-1] |= mask[:, 1:]
        d[:-1, :] |= mask[1:, :]
        d[:-1, :-1] |= mask[1:, 1:]
        mask = d
    h, w = prob.shape
    out = []
    for x0, y0, x1, y1 in _components(mask):
        bw, bh = x1 - x0 + 1, y1 - y0 + 1
        if min(bw, bh) < 3:
            continue
        if float(prob[y0:y1 + 1, x0:x1 + 1].mean()) < box_thresh:
            continue
        dist = bw * bh * unclip_ratio / (2 * (bw + bh))
        box = [max(0, x0 - dist), max(0, y0 - dist), min(w, x1 + 1 + dist), min(h, y1 + 1 + dist)]
        if min(box[2] - box[0], box[3] - box[1]) < 5:
            continue
        out.append(box)
    return np.asarray(out, np.float32).reshape(-1, 4)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def matches(pred: np.ndarray, truth: np.ndarray, iou: float = 0.5) -> int:
    """Greedy one-to-one matches at IoU >= iou, best pairs first."""
    m = iou_matrix(pred, truth)
    count = 0
    while m.size and m.max() >= iou:
        i, j = np.unravel_index(np.argmax(m), m.shape)
        m[i, :], m[:, j] = -1, -1
        count += 1
    return count


def hmean(preds: list, truths: list, iou: float = 0.5) -> dict:
    """Precision, recall and their harmonic mean over a data set of per-image box lists."""
    tp = sum(matches(p, t, iou) for p, t in zip(preds, truths))
    n_pred, n_true = sum(len(p) for p in preds), sum(len(t) for t in truths)
    precision, recall = tp / max(1, n_pred), tp / max(1, n_true)
    h = 0.0 if tp == 0 else 2 * precision * recall / (precision + recall)
    return {"precision": precision, "recall": recall, "hmean": h}


# --- PicoDet layout ------------------------------------------------------------------------

def picodet_decode(outputs: list[np.ndarray], input_hw=(800, 608), conf: float = 0.5,
                   iou: float = 0.5, strides=(8, 16, 32, 64)) -> list[list]:
    """rapid_layout PPPostProcess (GFL distribution decode, per-class hard NMS, top 1000 per
    level, keep 100) in input-image pixels. outputs: 4 score maps [N, A, C] then 4 box
    distributions [N, A, 4 * (reg_max + 1)]. Returns per image a list of (class, score, box)."""
    n_lv = len(outputs) // 2
    scores, dists = outputs[:n_lv], outputs[n_lv:]
    reg = dists[0].shape[-1] // 4
    result = []
    for b in range(scores[0].shape[0]):
        all_boxes, all_scores = [], []
        for stride, dist, score in zip(strides, dists, scores):
            fh, fw = math.ceil(input_hw[0] / stride), math.ceil(input_hw[1] / stride)
            hh, ww = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
            cx, cy = (ww.ravel() + 0.5) * stride, (hh.ravel() + 0.5) * stride
            centre = np.stack([cx, cy, cx, cy], 1)[: len(score[b])]
            d = dist[b].reshape(-1, reg).astype(np.float64)
            d = np.exp(d - d.max(1, keepdims=True))
            d = (d / d.sum(1, keepdims=True)) @ np.arange(reg)
            d = d.reshape(-1, 4) * stride
            s = score[b]
            top = np.argsort(s.max(1))[::-1][:1000]
            all_boxes.append(centre[top] + np.array([-1, -1, 1, 1]) * d[top])
            all_scores.append(s[top])
        boxes, sc = np.concatenate(all_boxes), np.concatenate(all_scores)
        dets = []
        for c in range(sc.shape[1]):
            keep = sc[:, c] > conf
            cb, cs = boxes[keep], sc[keep, c]
            order = np.argsort(cs)[::-1][:200]
            cb, cs = cb[order], cs[order]
            picked = []
            while len(cb) and len(picked) < 100:
                picked.append((c, float(cs[0]), cb[0].clip(0, [input_hw[1], input_hw[0]] * 2)))
                rest = iou_matrix(cb[:1], cb[1:])[0] <= iou
                cb, cs = cb[1:][rest], cs[1:][rest]
            dets.extend(picked)
        result.append(dets)
    return result


def detection_f1(preds: list[list], truths: list[list], iou: float = 0.5) -> dict:
    """Class-aware precision/recall/F1 of (class, score, box) or (class, box) detections."""
    def split(dets, c):
        return np.asarray([d[-1] for d in dets if d[0] == c], np.float64).reshape(-1, 4)

    tp = n_pred = n_true = 0
    for p, t in zip(preds, truths):
        for c in {d[0] for d in p} | {d[0] for d in t}:
            pc, tc = split(p, c), split(t, c)
            tp += matches(pc, tc, iou)
            n_pred, n_true = n_pred + len(pc), n_true + len(tc)
    precision, recall = tp / max(1, n_pred), tp / max(1, n_true)
    f1 = 0.0 if tp == 0 else 2 * precision * recall / (precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1}
