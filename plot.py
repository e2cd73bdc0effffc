"""`python llava_kd.py plot OUT [OUT ...] --out curves.png`: log.jsonl's curves as a picture, with
pillow alone. A panel a quantity (the loss and each term, the lr, the gradient's norm, tokens/s,
memory) against the step; the stages given one after another on one step axis; each step's value
light, its running mean dark, the held-out records (--eval_data) as dots on their term's panel."""

import json
import math
import os

from PIL import Image, ImageDraw, ImageFont

import errors

PANELS = ("loss", "L_reg", "L_res", "L_vis", "L_rel", "L_pro", "lr", "grad_norm", "tokens_per_s")
PANELS += ("peak_gib",)
UNITS = dict(tokens_per_s="tokens/s", peak_gib="peak memory, GiB", grad_norm="gradient norm")
W, H, COLUMNS = 440, 260, 3  # a panel's size in pixels; panels a row
LEFT, RIGHT, TOP, BOTTOM = 70, 16, 30, 38  # a panel's margins around its plot
TRAIN, MEAN, HELD_OUT, GRID = (166, 196, 230), (31, 90, 170), (222, 110, 20), (225, 225, 225)


def read_logs(outs):
    """[(name, training records, eval records)], a stage an --out, in the order given."""
    stages = []
    for out in outs:
        path = os.path.join(out, "log.jsonl")
        if not os.path.isfile(path):
            raise errors.UserError(f"plot {out}: no log.jsonl there; give a stage's --out")
        records = []
        for line in open(path):
            try:
                records.append(json.loads(line))
            except ValueError:  # a line a crash cut short
                continue
        train = [r for r in records if "loss" in r]
        held_out = [r for r in records if "eval_loss" in r]
        stages.append((os.path.basename(os.path.normpath(out)), train, held_out))
    if not any(train for _, train, _ in stages):
        raise errors.UserError(f"plot {' '.join(outs)}: no step logged yet")
    return stages


def series(stages, key):
    """Each stage's (training points, eval points) of one quantity, its steps after the last
    stage's; none where every value is 0 (a term the stage does not compute: L_res in sft)."""
    parts, offset = [], 0
    for _, records, evals in stages:
        train = [(offset + r["step"], r[key]) for r in records if key in r]
        held_out = [(offset + r["step"], r[f"eval_{key}"]) for r in evals if f"eval_{key}" in r]
        if any(y for _, y in train + held_out):
            parts.append((train, held_out))
        offset += max([r["step"] for r in records] + [0])
    return parts


def running_mean(points, width):
    """Each point's mean over the `width` points up to it."""
    total, out = 0.0, []
    for i, (x, y) in enumerate(points):
        total += y - (points[i - width][1] if i >= width else 0.0)
        out.append((x, total / min(i + 1, width)))
    return out


def ticks(low, high, n=5):
    """About n round values from low to high (1, 2 or 5 times a power of 10 apart)."""
    raw = (high - low) / max(n - 1, 1) or abs(high) or 1.0
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def font(size):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # pillow < 10.1, or without FreeType
        return ImageFont.load_default()


def label(y):
    return f"{y / 1000:.3g}k" if abs(y) >= 1000 else f"{y:.3g}"


def draw_panel(d, x0, y0, key, parts, bounds, last_step):
    """One panel at (x0, y0): its title, axes, grid, the stages' boundaries and each stage's
    curves."""
    small, title = font(12), font(14)
    d.text((x0 + LEFT, y0 + 6), UNITS.get(key, key), fill="black", font=title)
    left, top, right, bottom = x0 + LEFT, y0 + TOP, x0 + W - RIGHT, y0 + H - BOTTOM
    ys = [y for train, held_out in parts for _, y in train + held_out if math.isfinite(y)]
    low, high = min(ys), max(ys)
    pad = (high - low) * 0.05 or abs(high) * 0.05 or 1.0
    low, high = low - pad, high + pad

    def at(x, y):
        return left + (right - left) * x / last_step, bottom - (bottom - top) * (y - low) / (
            high - low
        )

    for y in ticks(low, high):
        _, py = at(0, y)
        d.line([(left, py), (right, py)], fill=GRID)
        d.text((left - 6, py), label(y), fill="black", font=small, anchor="rm")
    for x in ticks(0, last_step):
        px, _ = at(x, low)
        d.line([(px, top), (px, bottom)], fill=GRID)
        d.text((px, bottom + 4), f"{x:.0f}", fill="black", font=small, anchor="mt")
    for x in bounds:  # where a stage ends and the next starts
        px, _ = at(x, low)
        d.line([(px, top), (px, bottom)], fill=(150, 150, 150), width=2)
    d.rectangle([left, top, right, bottom], outline="black")
    d.text(((left + right) / 2, bottom + 20), "step", fill="black", font=small, anchor="mt")
    for train, held_out in parts:
        if len(train) > 1:
            d.line([at(x, y) for x, y in train], fill=TRAIN, width=1)
            mean = running_mean(train, max(1, len(train) // 25))
            d.line([at(x, y) for x, y in mean], fill=MEAN, width=2)
        if len(held_out) > 1:
            d.line([at(x, y) for x, y in held_out], fill=HELD_OUT, width=2)
        for x, y in held_out:
            px, py = at(x, y)
            d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=HELD_OUT)


def plot(outs, path):
    """The picture of these stages' logs, written to path (PNG)."""
    if not os.path.isdir(os.path.dirname(path) or "."):
        raise errors.UserError(f"plot --out {path}: no such folder; make it, or give another path")
    stages = read_logs(outs)
    curves = {key: series(stages, key) for key in PANELS}
    shown = [k for k in PANELS if curves[k]]
    bounds, last_step = [], 0
    for _, records, _ in stages:
        last_step += max([r["step"] for r in records] + [0])
        bounds.append(last_step)
    rows = math.ceil(len(shown) / COLUMNS)
    image = Image.new("RGB", (COLUMNS * W, 56 + rows * H), "white")
    d = ImageDraw.Draw(image)
    names = " -> ".join(f"{name} ({len(records)} steps)" for name, records, _ in stages)
    d.text((12, 8), names, fill="black", font=font(16))
    d.line([(12, 40), (40, 40)], fill=MEAN, width=2)
    legend = "training (light: each step; dark: running mean)"
    d.text((46, 40), legend, fill="black", font=font(13), anchor="lm")
    d.ellipse([376, 36, 384, 44], fill=HELD_OUT)
    d.text((392, 40), "held-out (--eval_data)", fill="black", font=font(13), anchor="lm")
    for i, key in enumerate(shown):
        x0, y0 = (i % COLUMNS) * W, 56 + (i // COLUMNS) * H
        draw_panel(d, x0, y0, key, curves[key], bounds[:-1], max(last_step, 1))
    image.save(path)
    print(f"plot: {len(shown)} panels of {len(stages)} stage(s) in {path}")
