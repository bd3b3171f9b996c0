"""Render a :class:`Document` as GitHub-flavoured Markdown with figures as PNG files beside it.

:func:`md` is the one escaping point: data strings can neither open HTML tags (``<`` and ``>``
become entities), nor links/emphasis/code (backslash escapes), nor break a table row (``|`` and
newlines).
"""

from __future__ import annotations

import re
from pathlib import Path

from featcache.report.document import (
    Code,
    Document,
    Figure,
    Heading,
    Hero,
    Para,
    Table,
    figure_files,
    vector_files,
)

_BACKSLASHED = re.compile(r"([\\`*_\[\]|#!{}$~])")  # $: GitHub renders $x$ as math; ~~: strikethrough


def md(text: object) -> str:
    """Escape text for Markdown (inline and table cells)."""
    s = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    s = _BACKSLASHED.sub(r"\\\1", s)
    return re.sub(r"\s*[\r\n]+\s*", " ", s)


def _table(t: Table) -> list[str]:
    cols = [md(c) for c in t.columns]
    align = ["---:" if i in t.numeric else "---" for i in range(len(cols))]
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join(align) + " |"]
    for r_i, row in enumerate(t.rows):
        cells = [md(c) if c != "" else " " for c in row]
        if r_i in t.highlight:
            cells = [f"**{c}**" if c.strip() else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    if t.caption:
        lines += ["", f"*{md(t.caption)}*"]
    return lines


def render_markdown(doc: Document, assets_dir: Path, assets_rel: str) -> str:
    """The Markdown text; figure PNGs are written to ``assets_dir`` and linked as ``assets_rel/name.png``."""
    assets_dir.mkdir(parents=True, exist_ok=True)
    out: list[str] = [f"# {md(doc.title)}", "", md(doc.subtitle), ""]
    written: set[str] = set()
    names = figure_files(doc)
    for b in doc.blocks:
        if isinstance(b, Heading):
            out += [f"{'#' * b.level} {md(b.text)}", ""]
        elif isinstance(b, Para):
            strong = f"**{md(b.strong)}** " if b.strong else ""
            prefix = "> " if b.kind in ("warn", "note") else ""
            text = f"*{md(b.text)}*" if b.kind == "muted" else md(b.text)
            out += [f"{prefix}{strong}{text}", ""]
        elif isinstance(b, Table):
            out += [*_table(b), ""]
        elif isinstance(b, Figure):
            name = names[id(b)]
            (assets_dir / name).write_bytes(b.png)
            written.add(name)
            out += [f"![{md(b.alt)}]({assets_rel}/{name})", "", f"*{md(b.caption)}*", ""]
            vector = vector_files(b, name)
            for fmt, other in vector.items():
                (assets_dir / other).write_bytes(b.vector[fmt])
                written.add(other)
            if vector:
                out += ["Vector copies: " + ", ".join(f"[{fmt.upper()}]({assets_rel}/{other})"
                                                      for fmt, other in vector.items()), ""]
        elif isinstance(b, Hero):
            out += [f"**{md(b.kicker)}: {md(b.title)}**", "", md(b.subtitle), ""]
            out += [
                f"- **{md(s.label)}:** {md(s.value)}" + (f" ({md(s.detail)})" if s.detail else "")
                for s in b.stats
            ]
            out.append("")
        elif isinstance(b, Code):
            fence = "~~~~"
            out += [fence, *(line.replace("~~~~", "~ ~ ~ ~") for line in b.lines), fence, ""]
    if doc.footer:
        out += ["---", "", f"*{md(doc.footer)}*", ""]
    for old in assets_dir.iterdir():  # figures of an earlier report that this one does not have
        if old.suffix in (".png", ".svg", ".pdf") and old.name not in written:
            old.unlink(missing_ok=True)
    return "\n".join(out)
