"""Render a :class:`Document` as ONE self-contained HTML file.

CSS is inline, figures are base64 PNG data URIs, there is no script and no external URL, so the
file opens offline, can be mailed, and a browser shows no console errors. Every text goes through
``html.escape`` here (and only here).
"""

from __future__ import annotations

import base64
import html

from featcache.report import document
from featcache.report.document import Code, Document, Figure, Heading, Hero, Para, Table

CSS = """
:root{--ink:#1d2430;--muted:#5b6573;--line:#dfe3e8;--bg:#f6f7f9;--accent:#1f5fa8;--best:#e8f3e8;
--warn-bg:#fff6e0;--warn:#8a5a00;--note-bg:#eaf2fb;}
*{box-sizing:border-box}
body{margin:0;font:14px/1.5 -apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
color:var(--ink);background:var(--bg)}
header{background:#142339;color:#fff;padding:20px 32px 14px}
header h1{margin:0;font-size:22px;font-weight:600}
header .sub{color:#b8c4d6;font-size:13px;margin-top:4px}
nav{position:sticky;top:0;z-index:2;background:#fff;border-bottom:1px solid var(--line);padding:8px 32px;
font-size:13px}
nav a{color:var(--accent);text-decoration:none;margin-right:18px}
main{max-width:1440px;margin:0 auto;padding:8px 32px 40px}
h2{font-size:18px;margin:30px 0 10px;padding-bottom:4px;border-bottom:2px solid var(--line)}
h3{font-size:15px;margin:22px 0 8px}
h4{font-size:14px;margin:16px 0 6px;color:var(--muted)}
p{margin:8px 0}
.callout{padding:10px 14px;border-radius:6px;margin:10px 0;border-left:4px solid}
.warn{background:var(--warn-bg);border-color:#e0a100;color:#4a3500}
.note{background:var(--note-bg);border-color:var(--accent)}
.muted{color:var(--muted);font-size:12.5px}
.hero{background:#fff;border:1px solid var(--line);border-radius:10px;padding:18px 22px;margin:18px 0;
box-shadow:0 1px 3px rgba(0,0,0,.05)}
.hero .kicker{font-size:12px;text-transform:uppercase;letter-spacing:.06em;color:var(--muted)}
.hero .title{font-size:22px;font-weight:650;margin:2px 0}
.hero .config{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;color:var(--muted);
word-break:break-word}
.stats{display:flex;flex-wrap:wrap;gap:12px;margin-top:14px}
.stat{flex:1 1 170px;background:var(--bg);border-radius:8px;padding:10px 14px}
.stat .label{font-size:12px;color:var(--muted)}
.stat .value{font-size:24px;font-weight:650;font-variant-numeric:tabular-nums}
.stat .detail{font-size:12px;color:var(--muted)}
.tablewrap{overflow-x:auto;background:#fff;border:1px solid var(--line);border-radius:8px;margin:8px 0}
.tablewrap{display:inline-block;max-width:100%;min-width:45%;vertical-align:top}
.tablewrap.wide{display:block}
table{border-collapse:collapse;width:100%;font-size:12.5px}
th,td{padding:5px 9px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600;position:sticky;top:0;vertical-align:bottom}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.num{white-space:nowrap}
td.num.ci{white-space:normal}
tbody tr:nth-child(even){background:#fafbfc}
tbody tr.best{background:var(--best);font-weight:600}
td.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:11px;min-width:110px;color:var(--muted)}
td.cfg{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:11.5px;min-width:190px;max-width:340px;
overflow-wrap:anywhere}
caption{caption-side:bottom;text-align:left;padding:6px 9px;color:var(--muted);font-size:12px}
figure{margin:10px 0 18px;background:#fff;border:1px solid var(--line);border-radius:8px;padding:10px}
figure img{max-width:100%;height:auto;display:block}
figcaption{color:var(--muted);font-size:12px;margin-top:6px}
pre{background:#fff;border:1px solid var(--line);border-radius:6px;padding:10px;overflow-x:auto;
font-size:12px;white-space:pre-wrap;word-break:break-all}
footer{color:var(--muted);font-size:12px;border-top:1px solid var(--line);margin-top:32px;padding-top:10px}
"""


def e(text: object) -> str:
    """Escape text for HTML content and attribute values."""
    return html.escape(str(text), quote=True)


def _table(t: Table) -> str:
    head = "".join(
        f'<th class="num">{e(c)}</th>' if i in t.numeric else f"<th>{e(c)}</th>"
        for i, c in enumerate(t.columns)
    )
    body = []
    for r_i, row in enumerate(t.rows):
        cells = []
        for c_i, cell in enumerate(row):
            cls = "num" if c_i in t.numeric else {"run id": "mono", "config": "cfg"}.get(t.columns[c_i], "")
            if cls == "num" and "CI" in t.columns[c_i]:  # "0.958 [0.875–1.000]" may wrap before its "["
                cls = "num ci"
            text = e(cell)
            if cls == "num ci":  # break between value and interval, never inside "0.875–1.000"
                text = text.replace("–", "\u2060–\u2060")
            cells.append(f'<td class="{cls}">{text}</td>' if cls else f"<td>{text}</td>")
        tr_cls = ' class="best"' if r_i in t.highlight else ""
        body.append(f"<tr{tr_cls}>{''.join(cells)}</tr>")
    cap = f"<caption>{e(t.caption)}</caption>" if t.caption else ""
    cls = f' class="{e(t.css_class)}"' if t.css_class else ""
    wrap = "tablewrap wide" if len(t.columns) >= 7 else "tablewrap"
    return (
        f'<div class="{wrap}"><table{cls}>{cap}<thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _hero(h: Hero) -> str:
    stats = "".join(
        f'<div class="stat"><div class="label">{e(s.label)}</div><div class="value">{e(s.value)}</div>'
        f'<div class="detail">{e(s.detail)}</div></div>'
        for s in h.stats
    )
    return (
        f'<section class="hero"><div class="kicker">{e(h.kicker)}</div>'
        f'<div class="title">{e(h.title)}</div><div class="config">{e(h.subtitle)}</div>'
        f'<div class="stats">{stats}</div></section>'
    )


def _block(b, names: dict[int, str], assets_rel: str) -> str:
    if isinstance(b, Heading):
        anchor = f' id="{e(b.anchor)}"' if b.anchor else ""
        return f"<h{b.level}{anchor}>{e(b.text)}</h{b.level}>"
    if isinstance(b, Para):
        strong = f"<strong>{e(b.strong)}</strong> " if b.strong else ""
        if b.kind in ("warn", "note"):
            return f'<div class="callout {b.kind}">{strong}{e(b.text)}</div>'
        cls = ' class="muted"' if b.kind == "muted" else ""
        return f"<p{cls}>{strong}{e(b.text)}</p>"
    if isinstance(b, Table):
        return _table(b)
    if isinstance(b, Figure):
        data = base64.b64encode(b.png).decode("ascii")
        links = "".join(f' <a href="{assets_rel}/{e(name)}">{e(fmt.upper())}</a>'
                        for fmt, name in document.vector_files(b, names.get(id(b), "")).items())
        return (
            f'<figure><img alt="{e(b.alt)}"{_screen_width(b.png)} src="data:image/png;base64,{data}">'
            f"<figcaption>{e(b.caption)}"
            + (f' <span class="muted">Vector copies in {assets_rel}/:{links}</span>' if links else "")
            + "</figcaption></figure>"
        )
    if isinstance(b, Hero):
        return _hero(b)
    if isinstance(b, Code):
        return f"<pre>{e(chr(10).join(b.lines))}</pre>"
    raise TypeError(f"unknown block {type(b).__name__}")


def render_html(doc: Document, assets_rel: str = "report_files") -> str:
    """The whole page as a string (UTF-8, no external resources; figures' vector copies, when asked for,
    are linked in ``assets_rel``, where the Markdown renderer writes them)."""
    nav = "".join(f'<a href="#{e(a)}">{e(label)}</a>' for a, label in doc.nav)
    names = document.figure_files(doc)
    body = "\n".join(_block(b, names, assets_rel) for b in doc.blocks)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>{e(doc.title)}</title><style>{CSS}</style></head><body>"
        f'<header><h1>{e(doc.title)}</h1><div class="sub">{e(doc.subtitle)}</div></header>'
        f"<nav>{nav}</nav><main>{body}<footer>{e(doc.footer)}</footer></main></body></html>\n"
    )


def _screen_width(png: bytes) -> str:
    """A width attribute showing a figure at the size it has at 90 dpi.

    Why: figures are rendered at 150 dpi so that report_files/ holds print-quality images, but shown at
    their pixel width in a browser they would be 1.7 times larger than designed. The width is read from
    the PNG header (bytes 16-19 of the IHDR chunk); anything else is shown as it is.
    """
    from featcache.report.plots import PNG_DPI, SCREEN_DPI

    if png[:8] != b"\x89PNG\r\n\x1a\n" or len(png) < 24:
        return ""
    return f' width="{round(int.from_bytes(png[16:20], "big") * SCREEN_DPI / PNG_DPI)}"'
