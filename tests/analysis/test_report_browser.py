"""The report opens in a real browser, offline: no console errors, and the heatmap is drawn.

Headless Chromium loads the HTML file from disk, logs the page console to stderr and writes a
screenshot, decoded here with zlib (no imaging dependency) to count coloured heatmap pixels.
A page with a deliberate script error is loaded first, to prove console errors are caught.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from rl_circuits.analysis.plots import relative_change_heatmap
from rl_circuits.analysis.report import write_report
from rl_circuits.analysis.stats import compare, table1_from_rows

pytestmark = pytest.mark.chromium

UPSTREAM = ("hook_embed", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out")
DOWNSTREAM = ("blocks.0.hook_q_input", "blocks.0.hook_mlp_in", "blocks.0.hook_resid_post")
MASK = np.array([[True, True, True], [False, True, True], [False, False, True]])


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(
        "headless Chromium is not installed; `make test` installs it as root, else run "
        "`sudo apt-get update && sudo apt-get install -y chromium`"
    )


def screenshot(page: Path, tmp_path: Path) -> tuple[Path, str]:
    """Load `page` in headless Chromium; return the screenshot and the browser's stderr."""
    shot = tmp_path / f"{page.stem}.png"
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / f'profile-{page.stem}'}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=5000",
        f"--screenshot={shot}",
        "--window-size=1200,900",
        page.resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.is_file(), f"no screenshot; stderr:\n{done.stderr[-2000:]}"
    return shot, done.stderr


def console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "Uncaught" in line or "ERROR:CONSOLE" in line]


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def read_png(path: Path) -> np.ndarray:
    """An 8-bit RGB or RGBA, non-interlaced PNG as a [height, width, channels] uint8 array."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    stride = width * bpp
    raw = zlib.decompress(b"".join(idat))
    image = np.zeros((height, stride), dtype=np.uint8)
    previous = np.zeros(stride, dtype=np.int64)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int64)
        if kind == 0:
            row = line
        elif kind == 1:  # Sub: running sum per channel
            row = np.cumsum(line.reshape(width, bpp), axis=0).ravel() % 256
        elif kind == 2:  # Up
            row = (line + previous) % 256
        else:  # Average or Paeth: byte by byte
            out, up = bytearray(stride), previous.tolist()
            for i, value in enumerate(line.tolist()):
                left = out[i - bpp] if i >= bpp else 0
                if kind == 3:
                    out[i] = (value + (left + up[i]) // 2) & 255
                else:
                    upper_left = up[i - bpp] if i >= bpp else 0
                    out[i] = (value + _paeth(left, up[i], upper_left)) & 255
            row = np.frombuffer(bytes(out), np.uint8).astype(np.int64)
        image[y] = row
        previous = row
    return image.reshape(height, width, bpp)[..., :3]


def test_console_errors_are_detected(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>undefinedFunction();</script></body></html>")
    _, stderr = screenshot(page, tmp_path)
    assert console_errors(stderr), "the browser log shows no console error for a broken page"


def test_report_renders_heatmap_without_console_errors(tmp_path):
    rng = np.random.default_rng(0)
    before = (0.5 + rng.random((8, 3, 3))) * MASK
    # Diagonal edges weaken (blue), the others strengthen (red).
    factor = np.where(np.eye(3, dtype=bool), 0.5, 1.6)
    after = before * factor
    figure = relative_change_heatmap(before, after, UPSTREAM, DOWNSTREAM, MASK)
    rows = compare(before, after, MASK, metrics=["activation_intensity"], n_resamples=50)
    rows = rows.assign(pair="Toy", algorithm="GRPO", dataset="MATH", alpha=0.5)
    page = write_report(
        tmp_path / "report.html",
        title="Browser check",
        table=table1_from_rows(rows.to_dict("records")),
        figures={"Figure 2": figure},
    )
    shot, stderr = screenshot(page, tmp_path)
    assert not console_errors(stderr), "\n".join(console_errors(stderr))

    image = read_png(shot).astype(int)
    assert image.shape == (900, 1200, 3)
    red, green, blue = image[..., 0], image[..., 1], image[..., 2]
    reds = np.count_nonzero((red - blue > 50) & (red - green > 50))
    blues = np.count_nonzero((blue - red > 50) & (blue - green > 20))
    white = np.count_nonzero(image.min(axis=2) > 245)
    total = image.shape[0] * image.shape[1]
    # Three red cells and three blue ones of about 280 x 70 px (2 % of the page) each.
    assert reds > 0.03 * total, f"only {reds} red pixels: heatmap not drawn?"
    assert blues > 0.03 * total, f"only {blues} blue pixels: no diverging colours?"
    assert white > 0.3 * total
