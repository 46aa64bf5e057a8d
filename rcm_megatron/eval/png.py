"""A dependency-free raster canvas (rectangles, lines, 5x7 bitmap text) and PNG writer, enough
for the benchmark's bar charts and sample grids without matplotlib."""

from __future__ import annotations

import struct
import zlib

import torch

_GLYPHS = {
    "0": "01110 10001 10011 10101 11001 10001 01110", "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111", "3": "11110 00001 00001 01110 00001 00001 11110",
    "4": "00010 00110 01010 10010 11111 00010 00010", "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110", "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110", "9": "01110 10001 10001 01111 00001 00010 01100",
    "A": "01110 10001 10001 11111 10001 10001 10001", "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110", "D": "11100 10010 10001 10001 10001 10010 11100",
    "E": "11111 10000 10000 11110 10000 10000 11111", "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111", "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110", "J": "00111 00010 00010 00010 00010 10010 01100",
    "K": "10001 10010 10100 11000 10100 10010 10001", "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001", "N": "10001 10001 11001 10101 10011 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110", "P": "11110 10001 10001 11110 10000 10000 10000",
    "Q": "01110 10001 10001 10001 10101 10010 01101", "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110", "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110", "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010", "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 01010 00100 00100 00100 00100", "Z": "11111 00001 00010 00100 01000 10000 11111",
    " ": "00000 00000 00000 00000 00000 00000 00000", ".": "00000 00000 00000 00000 00000 01100 01100",
    ",": "00000 00000 00000 00000 01100 00100 01000", ":": "00000 01100 01100 00000 01100 01100 00000",
    "-": "00000 00000 00000 11111 00000 00000 00000", "+": "00000 00100 00100 11111 00100 00100 00000",
    "=": "00000 00000 11111 00000 11111 00000 00000", "/": "00001 00010 00010 00100 01000 01000 10000",
    "(": "00010 00100 01000 01000 01000 00100 00010", ")": "01000 00100 00010 00010 00010 00100 01000",
    "[": "01110 01000 01000 01000 01000 01000 01110", "]": "01110 00010 00010 00010 00010 00010 01110",
    "%": "11001 11010 00010 00100 01000 01011 10011", "<": "00010 00100 01000 10000 01000 00100 00010",
    ">": "01000 00100 00010 00001 00010 00100 01000", "_": "00000 00000 00000 00000 00000 00000 11111",
    "x": "00000 00000 10001 01010 00100 01010 10001", "?": "01110 10001 00001 00010 00100 00000 00100",
}
_BITMAPS = {ch: torch.tensor([[c == "1" for c in row] for row in rows.split()], dtype=torch.bool)
            for ch, rows in _GLYPHS.items()}


class Canvas:
    """RGB image [H, W, 3] uint8 with top-left origin."""

    def __init__(self, width: int, height: int, background=(255, 255, 255)):
        self.img = torch.empty(height, width, 3, dtype=torch.uint8)
        self.img[:] = torch.tensor(background, dtype=torch.uint8)

    @property
    def height(self) -> int:
        return self.img.shape[0]

    @property
    def width(self) -> int:
        return self.img.shape[1]

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        """Fill [x0, x1) x [y0, y1), clipped."""
        x0, x1 = sorted((int(round(x0)), int(round(x1))))
        y0, y1 = sorted((int(round(y0)), int(round(y1))))
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, self.width), min(y1, self.height)
        if x1 > x0 and y1 > y0:
            self.img[y0:y1, x0:x1] = torch.tensor(color, dtype=torch.uint8)

    def hline(self, x0, x1, y, color, width: int = 1) -> None:
        self.rect(x0, y, x1, y + width, color)

    def vline(self, x, y0, y1, color, width: int = 1) -> None:
        self.rect(x, y0, x + width, y1, color)

    def dashed_hline(self, x0, x1, y, color, dash: int = 6) -> None:
        for x in range(int(x0), int(x1), 2 * dash):
            self.rect(x, y, min(x + dash, x1), y + 1, color)

    def text(self, x: int, y: int, s: str, color=(0, 0, 0), scale: int = 1, anchor: str = "left") -> int:
        """Draw ``s`` (upper-cased where no glyph) with its top at y; returns the text width."""
        w = self.text_width(s, scale)
        if anchor == "center":
            x -= w // 2
        elif anchor == "right":
            x -= w
        for i, ch in enumerate(s):
            bm = _BITMAPS.get(ch, _BITMAPS.get(ch.upper(), _BITMAPS["?"]))
            gx = x + i * 6 * scale
            for r, c in bm.nonzero().tolist():
                self.rect(gx + c * scale, y + r * scale, gx + (c + 1) * scale, y + (r + 1) * scale, color)
        return w

    @staticmethod
    def text_width(s: str, scale: int = 1) -> int:
        return max(len(s) * 6 - 1, 0) * scale

    def paste(self, x: int, y: int, rgb: torch.Tensor) -> None:
        """Paste an [h, w, 3] uint8 image at (x, y), clipped."""
        h, w = rgb.shape[:2]
        x1, y1 = min(x + w, self.width), min(y + h, self.height)
        if x1 > x and y1 > y:
            self.img[y:y1, x:x1] = rgb[: y1 - y, : x1 - x]

    def save(self, path: str) -> None:
        write_png(path, self.img)


def write_png(path: str, rgb: torch.Tensor) -> None:
    """Write an [H, W, 3] uint8 tensor as an 8-bit RGB PNG (zlib, filter 0 on every row)."""
    if rgb.dtype != torch.uint8 or rgb.dim() != 3 or rgb.shape[2] != 3:
        raise ValueError(f"write_png: expected [H, W, 3] uint8, got {rgb.dtype} {tuple(rgb.shape)}")
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + bytes(row) for row in rgb.contiguous().view(h, w * 3).tolist())

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 9)))
        f.write(chunk(b"IEND", b""))
