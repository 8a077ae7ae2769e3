"""Pictures of Florence-2 results: `draw(image, result)` for the output of `post_process_generation`.

The kind of drawing follows the answer's shape, not the task name, so every task (and any future one with
the same shapes) is drawn: text → a caption band under the picture; "bboxes" → boxes with their label
(and confidence, where the answer has "scores"); "quad_boxes" → OCR quadrilaterals with their text;
"polygons" → translucent masks; "bboxes_labels"/"polygons_labels" (open-vocabulary detection) → both.
"""

from __future__ import annotations

import textwrap
import zlib
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["draw"]

# Saturated colours that stay distinct from each other on photographs (Tableau 10, made brighter).
_PALETTE = [
    (31, 119, 255), (255, 127, 14), (44, 200, 44), (230, 40, 40), (160, 90, 220),
    (200, 110, 70), (240, 100, 200), (0, 200, 220), (190, 200, 30), (120, 120, 120),
]
# Pictures smaller than this (longest side) are enlarged before drawing, so labels stay readable.
_MIN_SIDE = 512
_FILL_ALPHA = 90


def draw(image: Any, result: dict[str, Any]):
    """Draws Florence-2 results on a copy of an image.

    Args:
        image: a PIL image, a path, or an H×W×3 uint8 array; the one whose size was given to
            post_process_generation.
        result: `{task: answer}` as post_process_generation returns it. Several tasks in one dict
            (`--task all`) give one panel per task, side by side.

    Returns:
        An RGB PIL image: the picture (enlarged when its longest side is under 512 pixels) with the answer
        drawn on it and a band underneath naming the task, holding the text of text answers.
    """
    base = _as_rgb(image)
    panels = [_panel(base, task, answer) for task, answer in result.items()]
    if not panels:
        return base
    return panels[0] if len(panels) == 1 else _tile(panels)


def _as_rgb(image: Any):
    """A new RGB image (convert copies), so that drawing never changes the caller's."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if hasattr(image, "__array__"):
        return Image.fromarray(np.asarray(image)).convert("RGB")
    with Image.open(image) as opened:
        return opened.convert("RGB")


def _panel(base, task: str, answer: Any):
    """One task's answer drawn on the picture, with a band below naming the task."""
    scale = max(1.0, _MIN_SIDE / max(base.size))
    picture = base.resize((round(base.width * scale), round(base.height * scale)), Image.BICUBIC) \
        if scale > 1 else base.copy()
    style = _Style(picture.size)
    overlay = Image.new("RGBA", picture.size, (0, 0, 0, 0))
    layers = (ImageDraw.Draw(overlay), ImageDraw.Draw(picture))
    if isinstance(answer, dict):
        _draw_shapes(layers, style, answer, scale)
        picture = Image.alpha_composite(picture.convert("RGBA"), overlay).convert("RGB")
        # Labels go on last so that no translucent mask covers them.
        _draw_labels(ImageDraw.Draw(picture), picture.width, style, answer, scale)
    caption = answer if isinstance(answer, str) else _summary(answer)
    return _with_band(picture, style, task, caption)


class _Style:
    """Line width and fonts scaled to the picture, so drawings read the same on small and large images."""

    def __init__(self, size: tuple[int, int]) -> None:
        side = max(size)
        self.width = max(2, round(side / 200))
        self.font = _font(max(14, round(side / 32)))
        self.band_font = _font(max(14, round(side / 34)))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _color(label: str, index: int) -> tuple[int, int, int]:
    """One colour per label (stable across pictures); unlabelled shapes take colours in turn."""
    key = zlib.crc32(label.encode()) if label else index
    return _PALETTE[key % len(_PALETTE)]


def _items(answer: dict[str, Any]) -> list[tuple[str, list, str, float | None]]:
    """(kind, points, label, score) for every shape of an answer; kind is "box", "quad" or "polygon"."""
    items = []
    groups = [("box", "bboxes", "labels", "scores"), ("box", "bboxes", "bboxes_labels", "bboxes_scores"),
              ("quad", "quad_boxes", "labels", "scores"), ("polygon", "polygons", "labels", None),
              ("polygon", "polygons", "polygons_labels", None)]
    for kind, shapes_key, labels_key, scores_key in groups:
        if shapes_key not in answer or labels_key not in answer:
            continue
        labels, scores = answer[labels_key], answer.get(scores_key) or []
        for i, shape in enumerate(answer[shapes_key]):
            label = labels[i] if i < len(labels) else ""
            score = scores[i] if i < len(scores) else None
            items.append((kind, shape, label, score))
    return items


def _draw_shapes(layers, style: _Style, answer: dict[str, Any], scale: float) -> None:
    overlay, picture = layers
    for index, (kind, shape, label, _) in enumerate(_items(answer)):
        color = _color(label, index)
        if kind == "box":
            x1, y1, x2, y2 = (v * scale for v in shape)
            picture.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=color, width=style.width)
            continue
        # A polygon instance may have several parts; a quad is one part of four points.
        for part in ([shape] if kind == "quad" else shape):
            points = [(part[j] * scale, part[j + 1] * scale) for j in range(0, len(part) - 1, 2)]
            if len(points) < 3:
                continue
            overlay.polygon(points, fill=color + (_FILL_ALPHA if kind == "polygon" else _FILL_ALPHA // 2,))
            picture.line(points + points[:1], fill=color, width=style.width)


def _draw_labels(canvas, picture_width: int, style: _Style, answer: dict[str, Any], scale: float) -> None:
    """A filled tag above each shape's top-left corner (inside it where the picture's top edge is in the way)."""
    for index, (_, shape, label, score) in enumerate(_items(answer)):
        text = label.strip()
        if score is not None:
            text = f"{text} {score:.2f}".strip()
        points = _flat_points(shape)
        if not text or not points:
            continue
        left = min(points[0::2]) * scale
        top = min(points[1::2]) * scale
        x0, y0, x1, y1 = canvas.textbbox((0, 0), text, font=style.font)
        pad = max(2, style.width)
        width, height = x1 - x0 + 2 * pad, y1 - y0 + 2 * pad
        left = min(max(0, left), max(0, picture_width - width))
        tag_top = top - height if top - height >= 0 else top
        color = _color(label, index)
        canvas.rectangle([left, tag_top, left + width, tag_top + height], fill=color)
        canvas.text((left + pad - x0, tag_top + pad - y0), text, font=style.font, fill=_ink(color))


def _flat_points(shape: Sequence) -> list[float]:
    """A box, a quad or a (multi-part) polygon as a flat [x, y, x, y, ...] list."""
    if shape and isinstance(shape[0], (list, tuple)):
        return [v for part in shape for v in part]
    return list(shape)


def _ink(color: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light colours, white on dark ones."""
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    return (0, 0, 0) if luminance > 150 else (255, 255, 255)


def _summary(answer: Any) -> str:
    """What a shapes answer holds, for the band: "3 boxes", "1 polygon", "nothing found"."""
    counts = {}
    for kind, *_ in _items(answer) if isinstance(answer, dict) else []:
        counts[kind] = counts.get(kind, 0) + 1
    if not counts:
        return "nothing found"
    names = {"box": ("box", "boxes"), "quad": ("text region", "text regions"), "polygon": ("polygon", "polygons")}
    return ", ".join(f"{n} {names[kind][n != 1]}" for kind, n in counts.items())


def _with_band(picture, style: _Style, task: str, text: str):
    """The picture over a white band: the task in bold colour, then the wrapped text."""
    measure = ImageDraw.Draw(picture)
    char_width = max(1, measure.textlength("abcdefghijklmnopqrstuvwxyz", font=style.band_font) / 26)
    wrap = max(10, int((picture.width - 20) / char_width))
    lines = [task] + (textwrap.wrap(text, wrap) or [""])
    line_height = measure.textbbox((0, 0), "Ag", font=style.band_font)[3] + 6
    band = Image.new("RGB", (picture.width, picture.height + line_height * len(lines) + 12), "white")
    band.paste(picture, (0, 0))
    canvas = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        canvas.text((10, picture.height + 6 + i * line_height), line, font=style.band_font,
                    fill=(30, 90, 200) if i == 0 else (0, 0, 0))
    return band


def _tile(panels: list):
    """Panels in a grid of up to four columns, on white."""
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    cell_w = max(p.width for p in panels)
    cell_h = max(p.height for p in panels)
    gap = 8
    sheet = Image.new("RGB", (columns * cell_w + (columns - 1) * gap, rows * cell_h + (rows - 1) * gap), "white")
    for i, panel in enumerate(panels):
        sheet.paste(panel, ((i % columns) * (cell_w + gap), (i // columns) * (cell_h + gap)))
    return sheet
