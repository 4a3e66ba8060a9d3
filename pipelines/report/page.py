"""The HTML of the report: one self-contained page, no script, no remote reference.

Every text that comes from the build (captions are hostile web text, so are URLs, details and
config values) goes through :func:`e`; pictures are ``data:`` URIs, charts are PNG files
beside the page named relatively. A URL of a web row appears as escaped text only, never as a
link.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;
background:#fafafa}
header{background:#1f3b57;color:#fff;padding:18px 32px}
header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;opacity:.85}
nav{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:8px 32px;
z-index:2}
nav a{margin-right:16px;color:#1f3b57;text-decoration:none;font-weight:600}
main{padding:8px 32px 48px;max-width:1500px}
section{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:8px 20px 16px;
margin:18px 0}
h2{border-bottom:2px solid #1f3b57;padding-bottom:4px}
h3{margin:18px 0 6px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:12.5px}
th,td{border:1px solid #ddd;padding:3px 7px;vertical-align:top}
th{background:#f0f3f6;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.total td{font-weight:700;background:#f7f7f7}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:10px}
figure{margin:0;border:1px solid #e3e3e3;border-radius:4px;background:#fcfcfc;padding:5px;
overflow:hidden}
figure img,.noimg{width:160px;height:160px;object-fit:contain;display:block;margin:auto;
background:#eee}
.noimg{display:flex;align-items:center;justify-content:center;color:#888;font-size:12px;
text-align:center}
figcaption{font-size:12px;margin-top:4px;overflow-wrap:anywhere}
.meta{color:#666;font-size:11px;font-family:ui-monospace,monospace;overflow-wrap:anywhere}
.pairs{display:grid;grid-template-columns:repeat(auto-fill,minmax(600px,1fr));gap:8px}
.ex{font-size:11.5px;border-bottom:1px dotted #ddd;overflow-wrap:anywhere;max-width:760px}
.pair{display:flex;gap:8px;align-items:flex-start;border:1px solid #e3e3e3;padding:6px;
border-radius:4px;margin:6px 0;background:#fcfcfc}
.pair figure{width:175px;flex:none}
.pair .why{font-size:12px;padding:4px 8px}
.ok{color:#2e7d32}.bad{color:#c62828;font-weight:700}
.note{color:#555;font-size:12.5px}
.chart{max-width:100%;height:auto;display:block;margin:6px 0}
.cols{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
details{margin:4px 0 10px}
code,.mono{font-family:ui-monospace,monospace;font-size:12px;overflow-wrap:anywhere}
"""

SECTIONS = [("funnel", "1. Funnel"), ("samples", "2. Samples"), ("duplicates", "3. Duplicates"),
            ("rejects", "4. Rejects"), ("captions", "5. Captions"), ("map", "6. Map"),
            ("datasheet", "7. Datasheet")]


def e(value: Any) -> str:
    """Escaped text of anything (None: an empty string)."""
    return "" if value is None else html.escape(str(value), quote=True)


def num(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return e(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return e(value)


def clip(text: Any, n: int = 240) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= n else s[: n - 1] + "…"


def _attr(name: str, value: str | None) -> str:
    return f' {name}="{e(value)}"' if value else ""


def table(header: Sequence[Any], rows: Iterable[Sequence[Any]], tid: str | None = None,
          cls: str = "") -> str:
    out = [f"<table{_attr('id', tid)}{_attr('class', cls)}>",
           "<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for r in rows:
        cells = "".join(
            f'<td class="n">{num(c)}</td>' if isinstance(c, int | float)
            and not isinstance(c, bool) else f"<td>{e(c)}</td>" for c in r)
        total = bool(r) and r[0] == "TOTAL"
        out.append(f"<tr{_attr('class', 'total' if total else None)}>{cells}</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def img(src: str, alt: str) -> str:
    return f'<img class="chart" src="{e(src)}" alt="{e(alt)}">'


def card(row: dict[str, Any] | None, uri: str | None, extra: str = "") -> str:
    if row is None:
        return '<figure><div class="noimg">not in the index</div></figure>'
    pic = (f'<img src="{e(uri)}" alt="{e(row.get("key"))}">' if uri
           else '<div class="noimg">image not readable</div>')
    score = row.get("clip_score")
    meta = " · ".join(e(x) for x in (row.get("key"), row.get("subset"), row.get("source"),
                                      row.get("caption_kind")) if x)
    if score is not None:
        meta += f" · clip {float(score):.3f}"
    return (f"<figure>{pic}<figcaption>{e(clip(row.get('caption')))}"
            f'<div class="meta">{meta}{extra}</div></figcaption></figure>')


def page(title: str, subtitle: str, sections: dict[str, str]) -> str:
    nav = "".join(f'<a href="#{sid}">{e(name)}</a>' for sid, name in SECTIONS)
    body = "\n".join(f'<section id="{sid}"><h2>{e(name)}</h2>\n{sections[sid]}\n</section>'
                     for sid, name in SECTIONS)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{e(title)}</title><style>{CSS}</style></head><body>\n"
            f"<header><h1>{e(title)}</h1><p>{e(subtitle)}</p></header>\n<nav>{nav}</nav>\n"
            f"<main>\n{body}\n</main></body></html>\n")
