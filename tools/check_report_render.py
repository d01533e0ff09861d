"""Render a ``qc analyze`` report in headless Chromium and check that every plot is visible.

    python tools/check_report_render.py REPORT_DIR [--screenshot out.png]

Two independent checks:

1. ``--dump-dom`` after the page's load event: the page's own script writes
   ``<body data-plots="k/n">`` counting ``img.plot`` elements that decoded to a
   non-empty image; all ``n`` must have loaded (and ``n`` must be the 5 plots).
2. a full-page ``--screenshot``: each plot's area is located by painting the page
   once more with every plot replaced by a solid marker colour (a copy of the page in a
   temporary folder) and finding those marker boxes; in the real screenshot each box
   must hold a drawn figure (many distinct colours, not blank).

Exit status 0 when both pass; prints one JSON line with the findings.  Needs
``chromium`` (``apt-get install -y chromium``); exits 2 with a message when it is missing.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

EXPECTED_PLOTS = ("ranges", "heatmap", "sensitivity", "error_vs_bits", "pareto")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--force-device-scale-factor=1"]
MARKERS = [(255, 0, 255), (0, 255, 0), (0, 255, 255), (255, 255, 0), (255, 0, 0), (0, 0, 255)]


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(browser: str, args: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="qc-chromium-") as profile:
        return subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                              timeout=timeout, check=False)


def dump_dom(browser: str, page: Path) -> str:
    res = _run(browser, ["--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()])
    return res.stdout


def screenshot(browser: str, page: Path, out: Path, width: int, height: int) -> np.ndarray:
    _run(browser, [f"--window-size={width},{height}", f"--screenshot={out}", page.resolve().as_uri()])
    if not out.is_file():
        raise RuntimeError(f"chromium wrote no screenshot to {out}")
    from PIL import Image

    return np.asarray(Image.open(out).convert("RGB"))


def _marker_png(color: tuple[int, int, int], size: tuple[int, int]) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def plot_boxes(browser: str, html: str, ids: list[str], width: int, height: int) -> dict[str, tuple[int, int, int, int]]:
    """Where each plot is painted: render a copy with each plot a solid marker image of its size, find the boxes."""
    marked = html
    sizes = _plot_sizes(html)
    for i, pid in enumerate(ids):
        pattern = re.compile(r"(<img class='plot' id='plot-" + re.escape(pid) + r"'[^>]*src=')[^']*(')")
        png = _marker_png(MARKERS[i % len(MARKERS)], sizes[pid])
        marked = pattern.sub(lambda m, png=png: m.group(1) + png + m.group(2), marked)
    with tempfile.TemporaryDirectory(prefix="qc-render-") as tmp:
        page = Path(tmp) / "marked.html"
        page.write_text(marked, encoding="utf-8")
        img = screenshot(browser, page, Path(tmp) / "marked.png", width, height)
    boxes = {}
    for i, pid in enumerate(ids):
        mask = np.all(img == np.array(MARKERS[i % len(MARKERS)], dtype=np.uint8), axis=-1)
        ys, xs = np.nonzero(mask)
        if len(ys) > 100:
            boxes[pid] = (int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max()))
    return boxes


def _plot_sizes(html: str) -> dict[str, tuple[int, int]]:
    import base64
    import io

    from PIL import Image

    out = {}
    for m in re.finditer(r"<img class='plot' id='plot-([^']+)'[^>]*src='data:image/png;base64,([^']+)'", html):
        w, h = Image.open(io.BytesIO(base64.b64decode(m.group(2)))).size
        out[m.group(1)] = (w, h)
    return out


def check(report_dir: Path, shot: Path | None = None, width: int = 1280, height: int = 9000) -> dict[str, object]:
    browser = chromium()
    if browser is None:
        raise FileNotFoundError("chromium is not installed (apt-get install -y chromium)")
    page = report_dir / "report.html"
    html = page.read_text(encoding="utf-8")
    ids = re.findall(r"<img class='plot' id='plot-([^']+)'", html)
    dom = dump_dom(browser, page)
    m = re.search(r'data-plots="(\d+)/(\d+)"', dom)
    loaded, total = (int(m.group(1)), int(m.group(2))) if m else (0, -1)
    boxes = plot_boxes(browser, html, ids, width, height)
    with tempfile.TemporaryDirectory(prefix="qc-shot-") as tmp:
        out = shot or Path(tmp) / "report.png"
        img = screenshot(browser, page, out, width, height)
    visible = {}
    for pid in ids:
        box = boxes.get(pid)
        if box is None:
            visible[pid] = False
            continue
        y0, y1, x0, x1 = box
        region = img[y0 : y1 + 1, x0 : x1 + 1].reshape(-1, 3)
        colors = len(np.unique(region[:: max(1, len(region) // 200000)], axis=0))
        dark = float((region.sum(axis=1) < 600).mean())
        visible[pid] = colors > 50 and dark > 0.005
    ok = (loaded == total == len(EXPECTED_PLOTS) and set(ids) == set(EXPECTED_PLOTS) and all(visible.values()))
    return {"ok": ok, "plots_loaded": f"{loaded}/{total}", "plots": ids, "visible": visible, "boxes": boxes,
            "screenshot": str(shot) if shot else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report_dir", type=Path)
    p.add_argument("--screenshot", type=Path, default=None, help="keep the full-page screenshot here")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=9000)
    args = p.parse_args(argv)
    try:
        res = check(args.report_dir, args.screenshot, args.width, args.height)
    except FileNotFoundError as e:
        print(f"check_report_render: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
