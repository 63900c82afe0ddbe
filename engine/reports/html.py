"""What every HTML report shares: the page frame and stylesheets, escaping, small tables, PNG data URIs.

Reports are self-contained pages: no script, nothing fetched, every figure an embedded PNG
(``data:image/png;base64,...``). The helpers here are the one copy of that machinery; the
reports themselves (:mod:`engine.reports.run_report`, :mod:`engine.reports.clinical`) only
arrange their content.

One base stylesheet; each report adds what is its own (the clinical report's tables are numeric
and right-aligned, the run report's textual and left-aligned).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "BASE_CSS",
    "RUN_REPORT_CSS",
    "CLINICAL_REPORT_CSS",
    "page",
    "esc",
    "num",
    "badge",
    "kv_table",
    "hash_code",
    "png_data_uri",
    "rgb_png_uri",
]

#: What both reports' pages share: typography, headings, table frame, muted notes, images.
BASE_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1b1b1b;max-width:1150px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:3px;margin-top:30px}
table{border-collapse:collapse;margin:6px 0} th,td{border:1px solid #d0d0d0} th{background:#f2f2f2}
.muted{color:#666;font-size:12px} img{max-width:100%}
"""

#: Stylesheet of the regulator's run report: textual, left-aligned tables, badges, candidate rows.
RUN_REPORT_CSS = BASE_CSS + """
h3{font-size:15px;margin:18px 0 6px} h4{font-size:13px;margin:12px 0 4px}
table{font-size:12.5px} th,td{padding:3px 7px;text-align:left;vertical-align:top}
td.w{overflow-wrap:anywhere} td.n{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;color:#fff;border-radius:3px;padding:1px 7px;font-size:12px;font-weight:600}
.ok{color:#2e7d32;font-weight:600} .bad{color:#c62828;font-weight:600}
.box{border:1px solid #ccc;background:#fafafa;padding:8px 12px;margin:8px 0} code{font-size:12px}
tr.chosen td{background:#e8f5e9} tr.treated td{background:#fff8e1} details{margin:6px 0}
pre{background:#f6f6f6;padding:6px;font-size:11px;overflow-x:auto;max-height:420px}
.figs{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start} img{border:1px solid #ddd}
"""

#: Stylesheet of the per-image clinical report: numeric, right-aligned tables, probability bars, legends.
CLINICAL_REPORT_CSS = BASE_CSS + """
h3{font-size:15px;margin-bottom:6px} table{font-size:13px} th,td{padding:3px 8px;text-align:right}
td.l,th.l{text-align:left} .disc{background:#fff8e1;border:1px solid #f0d58c;padding:8px;font-size:13px}
.pos{color:#b00020;font-weight:600} .bord{color:#b26a00;font-weight:600} .unl{text-decoration:line-through}
.note{background:#eef5ff;border-left:4px solid #3b73c4;padding:6px 10px;margin:6px 0;font-size:13px}
.bar{position:relative;width:160px;height:10px;background:#eee;display:inline-block}
.bar span{position:absolute;left:0;top:0;bottom:0;background:#5b8def}
.bar i{position:absolute;top:-3px;bottom:-3px;width:2px;background:#b00020}
img{image-rendering:auto} .kv td{text-align:left}
.fig{display:flex;gap:14px;align-items:flex-start;margin:6px 0} .fig img{border:1px solid #ccc}
.legend{font-size:12px;color:#333;max-width:300px} .legend div{margin:2px 0}
.sw{display:inline-block;width:12px;height:12px;margin-right:6px;vertical-align:middle;border:1px solid #888}
"""


def page(title: str, css: str, body: Sequence[str]) -> str:
    """A whole page: ``title`` is already escaped HTML; the body parts are joined one per line."""
    head = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{css}</style></head><body>")
    return "\n".join([head, *body, "</body></html>"])


def esc(x: Any) -> str:
    """HTML-escaped text of ``x``; ``None`` is the empty string."""
    return html.escape("" if x is None else str(x))


def num(x: Any, spec: str = ".3f") -> str:
    """``x`` formatted as a number, ``n/a`` for ``None``, escaped text when it is not a number."""
    if x is None:
        return "n/a"
    try:
        return format(float(x), spec)
    except (TypeError, ValueError):
        return esc(x)


def badge(text: str, colour: str) -> str:
    return f"<span class='badge' style='background:{colour}'>{esc(text)}</span>"


def kv_table(rows: Iterable[tuple[str, Any]]) -> str:
    """A two-column table: escaped keys, values as given (already HTML)."""
    return "<table>" + "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def hash_code(h: Any) -> str:
    return "n/a" if not h else f"<code>{esc(h)}</code>"


def _png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def png_data_uri(fig: Any) -> str:
    """A matplotlib figure as a ``data:image/png;base64,...`` URI (the figure is not kept)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return _png_uri(buf.getvalue())


def rgb_png_uri(rgb: np.ndarray) -> str:
    """An (H, W, 3) RGB array (0..255, clipped) as a PNG data URI."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB").save(buf, format="PNG", optimize=False)
    return _png_uri(buf.getvalue())
