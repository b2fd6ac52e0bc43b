"""Deterministic synthetic images drawn with PIL and the Debian DejaVu fonts (fonts-dejavu-core).

Every function takes a numpy Generator, so a seed fixes the image; callers use different seeds
for calibration and test sets. Images are RGB uint8 [H, W, 3]; boxes are [x0, y0, x1, y1] in
pixels (x1, y1 exclusive).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
WORDS = ("the of and to in is for on with as by at from that this be are was or an it not "
         "invoice total amount date receipt quantity price tax order number customer address "
         "phone email shipping payment balance due account reference item description unit "
         "discount subtotal model network layer weight scale report page table figure section "
         "chapter results method data value system public market energy water health school "
         "city river north south station street office letter service support contact open "
         "close monday friday january march october summary notes version update release "
         "Berlin Paris London Tokyo Madrid Oslo Vienna Geneva Boston Denver Austin Seattle "
         "ONNX INT8 CPU GPU API USB PDF HTTP JSON").split()
# CDLA layout classes, in the order of layout_cdla.onnx's `character` metadata
LAYOUT_CLASSES = ("text", "title", "figure", "figure_caption", "table", "table_caption",
                  "header", "footer", "reference", "equation")


@lru_cache(maxsize=None)
def font_files() -> tuple[str, ...]:
    files = sorted(str(p) for p in FONT_DIR.glob("DejaVu*.ttf")
                   if "ExtraLight" not in p.name and "Math" not in p.name)
    if not files:
        raise SystemExit(f"no DejaVu fonts in {FONT_DIR}: apt-get install fonts-dejavu-core")
    return tuple(files)


@lru_cache(maxsize=512)
def font(path: str, px: int):
    from PIL import ImageFont

    return ImageFont.truetype(path, px)


def random_font(rng: np.random.Generator, px: int, bold: bool = False):
    files = [f for f in font_files() if ("Bold" in f) == bold] or list(font_files())
    return font(files[int(rng.integers(len(files)))], int(px))


def token(rng: np.random.Generator) -> str:
    """A word, a number, a price, a date or a code: printable ASCII only."""
    kind = rng.random()
    if kind < 0.62:
        w = str(rng.choice(WORDS))
        style = rng.random()
        w = w.capitalize() if style < 0.25 else w.upper() if style < 0.32 else w
        if rng.random() < 0.12:
            w += str(rng.choice(list(",.:;!?")))
        return w
    if kind < 0.74:
        return str(int(rng.integers(0, 10 ** int(rng.integers(1, 6)))))
    if kind < 0.82:
        return f"{rng.choice(['$', '', ''])}{int(rng.integers(0, 999))}.{int(rng.integers(0, 99)):02d}"
    if kind < 0.9:
        return (f"{int(rng.integers(1, 29)):02d}/{int(rng.integers(1, 13)):02d}/"
                f"{int(rng.integers(1990, 2030))}")
    letters = "".join(rng.choice(list("ABCDEFGHJKLMNPRSTUVWXYZ"), int(rng.integers(2, 4))))
    return f"{letters}-{int(rng.integers(0, 99999))}{rng.choice(['', '%', '#', ')', '&'])}"


def _noisy(img, rng: np.random.Generator, sigma: float = 3.0) -> np.ndarray:
    arr = np.asarray(img, np.float32) + rng.normal(0, sigma, np.asarray(img).shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def text_line(rng: np.random.Generator, max_ratio: float = 320 / 48,
              max_tokens: int = 6) -> tuple[np.ndarray, str]:
    """One cropped text line (as a detector crop would look) whose width/height fits max_ratio,
    and its text. Dark text on a light, tinted background; some lines blurred; pixel noise."""
    from PIL import Image, ImageDraw, ImageFilter

    px = int(rng.integers(14, 40))
    f = random_font(rng, px, bold=rng.random() < 0.25)
    words = [token(rng) for _ in range(int(rng.integers(1, max_tokens + 1)))]
    pad_x, pad_y = int(rng.integers(2, 10)), int(rng.integers(3, max(4, px // 3)))
    while True:
        text = " ".join(words)
        x0, y0, x1, y1 = f.getbbox(text)
        w, h = x1 - x0 + 2 * pad_x, max(y1 - y0, px) + 2 * pad_y
        if w / h <= max_ratio or len(words) == 1 and len(text) <= 3:
            break
        if len(words) > 1:
            words.pop()
        else:
            words = [text[: max(3, len(text) * 2 // 3)]]
    bg = tuple(int(v) for v in rng.integers(150, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 110, 3))
    img = Image.new("RGB", (w, h), bg)
    ImageDraw.Draw(img).text((pad_x - x0, (h - (y1 + y0)) // 2), text, font=f, fill=fg)
    if rng.random() < 0.4:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2))))
    return _noisy(img, rng, float(rng.uniform(2, 8))), text


def text_page(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A scene-text-like page: lines of words in random fonts, sizes and colours on a noisy
    gradient with a few outline shapes as distractors. Returns (image, line boxes [M, 4])."""
    from PIL import Image, ImageDraw

    h, w = size
    top, bottom = rng.integers(170, 256, 3), rng.integers(140, 256, 3)
    ramp = np.linspace(0, 1, h)[:, None, None]
    bg = (top * (1 - ramp) + bottom * ramp).repeat(w, axis=1)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        box = [x0, y0, x0 + int(rng.integers(20, 120)), y0 + int(rng.integers(20, 120))]
        draw.rectangle(box, outline=tuple(int(v) for v in rng.integers(0, 200, 3)), width=2)
    boxes = []
    y = int(rng.integers(6, 30))
    while True:
        px = int(rng.integers(16, 40))
        if y + px * 1.4 > h - 6:
            break
        f = random_font(rng, px, bold=rng.random() < 0.3)
        text = " ".join(token(rng) for _ in range(int(rng.integers(1, 6))))
        x = int(rng.integers(6, max(7, w // 3)))
        x0, y0, x1, y1 = draw.textbbox((x, y), text, font=f)
        if x1 > w - 6:  # keep every line whole inside the page: the labels must be exact
            y += px // 2
            continue
        draw.text((x, y), text, font=f, fill=tuple(int(v) for v in rng.integers(0, 90, 3)))
        boxes.append([x0, y0, x1, y1])
        y = y1 + int(rng.integers(10, 40))
    return _noisy(img, rng, 4.0), np.asarray(boxes, np.float32).reshape(-1, 4)


def document(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, list]:
    """A document page on white: header, title, paragraphs, a figure with caption, a table
    with caption, footer. Returns (image, [(class index in LAYOUT_CLASSES, box), ...])."""
    from PIL import Image, ImageDraw

    h, w = size
    img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(238, 256, 3)))
    draw = ImageDraw.Draw(img)
    blocks: list = []
    margin = int(w * rng.uniform(0.06, 0.1))
    body = max(11, int(h * rng.uniform(0.016, 0.022)))
    ink = tuple(int(v) for v in rng.integers(0, 50, 3))

    def line_block(x, y, width, px, n_lines, bold=False, cls=0, last_short=True):
        f = random_font(rng, px, bold)
        top, right, bottom = y, x, y
        for i in range(n_lines):
            words = []
            while True:
                cand = " ".join(words + [token(rng)])
                if f.getlength(cand) > width:
                    break
                words = cand.split(" ")
            if i == n_lines - 1 and last_short and len(words) > 2:
                words = words[: max(1, int(len(words) * rng.uniform(0.3, 0.9)))]
            text = " ".join(words) or "x"
            draw.text((x, y), text, font=f, fill=ink)
            bx = draw.textbbox((x, y), text, font=f)
            right, bottom = max(right, bx[2]), bx[3]
            y += int(px * 1.45)
        blocks.append((cls, [x, top, right, bottom]))
        return y

    y = int(h * 0.025)
    y = line_block(margin, y, w * 0.5, max(9, body - 3), 1, cls=6, last_short=False)
    draw.line([margin, y, w - margin, y], fill=(150, 150, 150), width=1)
    y += int(body * 1.5)
    y = line_block(margin, y, w - 2 * margin, int(body * rng.uniform(1.5, 2.2)), 1, bold=True,
                   cls=1) + body
    footer_top = h - int(h * 0.05)
    items = ["text", "text", "figure", "table", "text", "text"]
    rng.shuffle(items)
    for item in items:
        if item == "text":
            n = int(rng.integers(2, 6))
            if y + n * body * 1.45 > footer_top - body:
                continue
            y = line_block(margin, y, w - 2 * margin, body, n) + body
        elif item == "figure":
            fh, fw = int(h * rng.uniform(0.12, 0.2)), int((w - 2 * margin) * rng.uniform(0.5, 0.9))
            if y + fh + 3 * body > footer_top:
                continue
            x0 = (w - fw) // 2
            tint = tuple(int(v) for v in rng.integers(60, 230, 3))
            fig = Image.new("RGB", (fw, fh), tint)
            fig_draw = ImageDraw.Draw(fig)
            for _ in range(int(rng.integers(3, 8))):
                cx, cy = int(rng.integers(0, fw)), int(rng.integers(0, fh))
                r = int(rng.integers(5, max(6, fh // 3)))
                fig_draw.ellipse([cx - r, cy - r, cx + r, cy + r],
                                 fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
            img.paste(fig, (x0, y))
            draw.rectangle([x0 - 1, y - 1, x0 + fw + 1, y + fh + 1], outline=ink)
            blocks.append((2, [x0 - 1, y - 1, x0 + fw + 2, y + fh + 2]))
            y += fh + int(body * 0.6)
            y = line_block(x0, y, fw, max(9, body - 2), 1, cls=3, last_short=False) + body
        else:
            rows, cols = int(rng.integers(3, 7)), int(rng.integers(2, 5))
            rh = int(body * 1.8)
            if y + rows * rh + 3 * body > footer_top:
                continue
            y = line_block(margin, y, w - 2 * margin, max(9, body - 2), 1, cls=5,
                           last_short=False) + int(body * 0.4)
            tw = w - 2 * margin
            cw = tw // cols
            f = random_font(rng, max(9, body - 2))
            for r in range(rows + 1):
                draw.line([margin, y + r * rh, margin + cols * cw, y + r * rh], fill=ink)
            for c in range(cols + 1):
                draw.line([margin + c * cw, y, margin + c * cw, y + rows * rh], fill=ink)
            for r in range(rows):
                for c in range(cols):
                    draw.text((margin + c * cw + 4, y + r * rh + rh // 5),
                              token(rng)[: max(2, cw // body)], font=f, fill=ink)
            blocks.append((4, [margin, y, margin + cols * cw + 1, y + rows * rh + 1]))
            y += rows * rh + body
    line_block(w // 2 - body, footer_top, 4 * body, max(9, body - 3), 1, cls=7, last_short=False)
    return _noisy(img, rng, 2.0), blocks
