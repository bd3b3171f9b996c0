"""A tiny format-neutral document model shared by the HTML and Markdown renderers.

The builder puts PLAIN text (straight from run data) into these blocks; each renderer escapes it in
exactly one place. Keeping markup out of the content is what makes the reports injection-safe:
no builder code can forget to escape a file name, tag or parameter value.
"""

from __future__ import annotations

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
