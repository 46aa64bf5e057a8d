"""The benchmark figure: one bar panel per metric (methods x sampling steps, with the teacher and
the data floor as reference lines) and a grid of generated videos, drawn with ``png.py``."""

from __future__ import annotations

import math

import torch

from ..data.toy import CLASSES
from .png import Canvas

METHOD_COLORS = {"scm": (230, 140, 30), "dmd": (60, 120, 220), "rcm": (200, 40, 60), "dcm": (120, 120, 120)}
TEACHER_COLOR = (20, 150, 60)
DATA_COLOR = (120, 120, 120)
PALETTE = torch.tensor([[255, 80, 60], [60, 200, 90], [70, 120, 255], [250, 200, 40]], dtype=torch.float64) / 255
# (metric, title, y range: "log" or (lo, hi))
PANELS = (("fd", "FRECHET DISTANCE (LOG)", "log"), ("precision", "PRECISION", (0.0, 1.0)),
          ("detail_amplitude", "FINE DETAIL (DATA = 1)", (0.0, 1.5)), ("coverage", "MODE COVERAGE", (0.0, 1.0)),
          ("diversity", "DIVERSITY (DATA = 1)", (0.0, 1.5)))


def video_to_rgb(x: torch.Tensor, scale: int = 3) -> torch.Tensor:
    """[C, T, H, W] latent -> [H*scale, T*(W*scale + 2), 3] uint8: each class colour maps to a palette colour."""
    colors = torch.tensor([c.color for c in CLASSES], dtype=torch.float64)  # [K, C], orthonormal rows
    m = PALETTE.T @ colors  # [3, C]: u_c -> palette_c
    c, t, h, w = x.shape
    rgb = torch.einsum("rc,cthw->thwr", m, x.to(torch.float64))  # [T, H, W, 3]
    img = (0.5 + 0.16 * rgb).clamp(0, 1)
    img = img.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    frames = [torch.cat([f, torch.ones(h * scale, 2, 3, dtype=f.dtype)], dim=1) for f in img]
    return (torch.cat(frames, dim=1) * 255).round().to(torch.uint8)


def _short(v: float) -> str:
    """At most 4 characters: '.93', '1.25', '12.3', '140'."""
    if abs(v) < 1:
        return f"{v:.2f}".replace("0.", ".", 1)
    if abs(v) < 10:
        return f"{v:.1f}"
    return f"{v:.1f}" if abs(v) < 100 else f"{v:.0f}"


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _bar_panel(cv: Canvas, x0: int, y0: int, w: int, h: int, title: str, results: dict, key: str, yrange) -> None:
    log = yrange == "log"
    methods = list(results["methods"])
    steps = sorted({int(s) for m in methods for s in results["methods"][m]})
    vals = [results["methods"][m][str(s)][key] for m in methods for s in steps if str(s) in results["methods"][m]]
    refs = [results[r][key] for r in ("teacher", "data") if r in results]
    top = max(vals + refs + [1e-9])
    if log:
        lo_v = min(v for v in vals + refs if v > 0)
        lo, hi = 10 ** math.floor(math.log10(lo_v)), 10 ** math.ceil(math.log10(top))

        def ypos(v):
            v = min(max(v, lo), hi)
            return y0 + h - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * h
    else:
        lo, hi = yrange

        def ypos(v):
            return y0 + h - (min(max(v, lo), hi) - lo) / (hi - lo) * h
    cv.text(x0 + w // 2, y0 - 22, title, scale=1, anchor="center")
    cv.vline(x0, y0, y0 + h + 1, (0, 0, 0))
    cv.hline(x0, x0 + w, y0 + h, (0, 0, 0))
    ticks = [10 ** e for e in range(int(round(math.log10(lo))), int(round(math.log10(hi))) + 1)] if log else \
        [lo + (hi - lo) * i / (3 if hi == 1.5 else 4) for i in range(4 if hi == 1.5 else 5)]
    for tv in ticks:
        y = int(ypos(tv))
        cv.hline(x0 - 3, x0, y, (0, 0, 0))
        cv.text(x0 - 5, y - 3, _fmt(tv) if not log else f"1E{int(round(math.log10(tv)))}", anchor="right",
                color=(80, 80, 80))
    group_w = w / len(steps)
    bar_w = max(4, int(group_w * 0.94 / len(methods)))
    for gi, s in enumerate(steps):
        gx = x0 + gi * group_w + (group_w - bar_w * len(methods)) / 2
        for mi, m in enumerate(methods):
            r = results["methods"][m].get(str(s))
            if r is None:
                continue
            bx = int(gx + mi * bar_w)
            y = int(ypos(r[key]))
            cv.rect(bx + 1, y, bx + bar_w - 1, y0 + h, METHOD_COLORS.get(m, (100, 100, 100)))
            cv.text(bx + bar_w // 2, y - 9, _short(r[key]), anchor="center", color=(40, 40, 40))
        cv.text(int(x0 + (gi + 0.5) * group_w), y0 + h + 6, f"{s} STEP" + ("S" if s > 1 else ""), anchor="center")
    for ref, color in (("teacher", TEACHER_COLOR), ("data", DATA_COLOR)):
        if ref in results and (not log or results[ref][key] > 0):
            y = int(ypos(results[ref][key]))
            cv.dashed_hline(x0, x0 + w, y, color)


def plot_benchmark(results: dict, samples: dict, path: str, title: str) -> None:
    """results: {"teacher", "data", "methods": {method: {steps: metrics}}}; samples: {row label: [n, C, T, H, W]}."""
    width = 1180
    panel_w, panel_h = 180, 190
    rows = list(samples.items())
    half = (len(rows) + 1) // 2
    thumb = video_to_rgb(next(iter(samples.values()))[0])
    row_h = thumb.shape[0] + 10
    height = 100 + panel_h + 60 + half * row_h + 20
    cv = Canvas(width, height)
    cv.text(width // 2, 12, title, scale=2, anchor="center")
    # legend
    lx = 40
    for m in results["methods"]:
        cv.rect(lx, 42, lx + 14, 52, METHOD_COLORS.get(m, (100, 100, 100)))
        lx += 20 + cv.text(lx + 20, 44, m.upper()) + 20
    cv.dashed_hline(lx, lx + 30, 47, TEACHER_COLOR)
    lx += 36 + cv.text(lx + 36, 44, f"TEACHER ({results['teacher']['steps']} STEPS, CFG {results['teacher'].get('cfg_scale', 1)})")
    lx += 20
    cv.dashed_hline(lx, lx + 30, 47, DATA_COLOR)
    cv.text(lx + 36, 44, "HELD-OUT DATA (NOISE FLOOR)")
    for i, (key, label, yrange) in enumerate(PANELS):
        _bar_panel(cv, 60 + i * (panel_w + 44), 100, panel_w, panel_h, label, results, key, yrange)
    y = 100 + panel_h + 40
    cv.text(20, y, "SAMPLES: ONE PER CLASS, FRAMES 0-3 LEFT TO RIGHT (COLOUR = CHANNEL PROJECTION ON THE CLASS COLOURS)")
    y += 20
    col_w = width // 2
    for i, (label, x) in enumerate(rows):
        cx = 10 + (i // half) * col_w
        cy = y + (i % half) * row_h
        cv.text(cx, cy + thumb.shape[0] // 2 - 3, label)
        px = cx + 110
        for j in range(min(4, x.shape[0])):
            im = video_to_rgb(x[j])
            cv.paste(px, cy, im)
            px += im.shape[1] + 8
    cv.save(path)
