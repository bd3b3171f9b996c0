"""A tiny format-neutral document model shared by the HTML and Markdown renderers.

The builder puts PLAIN text (straight from run data) into these blocks; each renderer escapes it in
exactly one place. Keeping markup out of the content is what makes the reports injection-safe:
no builder code can forget to escape a file name, tag or parameter value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass
class Heading:
    text: str
    level: int = 2
    anchor: str = ""


@dataclass
class Para:
    text: str
    kind: str = "text"  # "text" | "note" | "warn" | "muted"
    strong: str = ""  # bold lead-in, e.g. "Note:"


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    numeric: set[int] = field(default_factory=set)  # right-aligned column indexes
    highlight: set[int] = field(default_factory=set)  # row indexes shown as "best"
    caption: str = ""
    css_class: str = ""


@dataclass
class Figure:
    name: str  # file stem for the Markdown copy, e.g. "run-1"
    png: bytes
    caption: str
    alt: str
    vector: dict[str, bytes] = field(default_factory=dict)  # "svg"/"pdf" copies for report_files/


@dataclass
class Stat:
    label: str
    value: str
    detail: str = ""


@dataclass
class Hero:
    title: str  # e.g. "mobilenet-0.75 · logreg"
    subtitle: str  # the config
    stats: list[Stat]
    kicker: str = "Best run (ranked on validation data)"  # whose best: "Best run of task 3class (...)"


@dataclass
class Code:
    lines: list[str]


Block = Heading | Para | Table | Figure | Hero | Code


@dataclass
class Document:
    title: str
    subtitle: str
    blocks: list[Block] = field(default_factory=list)
    nav: list[tuple[str, str]] = field(default_factory=list)  # (anchor, label)
    footer: str = ""

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)

    def section(self, text: str, anchor: str) -> None:
        """A level-2 heading that also appears in the navigation bar."""
        self.nav.append((anchor, text))
        self.blocks.append(Heading(text, 2, anchor))


def figure_files(doc: Document) -> dict[int, str]:
    """{id(figure block): its PNG's file name in report_files/}; vector copies share the stem.

    Why here: the Markdown writes the files and the HTML links the vector copies, so both must name
    them the same. A second figure with the name of an earlier one gets ``stem-2.png``...: two figures
    with one name (a binary and a 3-class grid of one head and backbone) made the second PNG overwrite
    the first, and the Markdown showed one figure twice.
    """
    names: dict[int, str] = {}
    taken: set[str] = set()
    for b in doc.blocks:
        if isinstance(b, Figure):
            stem = re.sub(r"[^A-Za-z0-9_.-]", "_", b.name)
            name, k = f"{stem}.png", 1
            while name in taken:
                k += 1
                name = f"{stem}-{k}.png"
            taken.add(name)
            names[id(b)] = name
    return names


def vector_files(b: Figure, png_name: str) -> dict[str, str]:
    """{format: file name} of a figure's vector copies: run-1.png -> run-1.svg, run-1.pdf."""
    return {fmt: f"{png_name[:-len('.png')]}.{fmt}" for fmt in b.vector}
