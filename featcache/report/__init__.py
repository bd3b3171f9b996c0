"""Report rendering (HTML, Markdown, CSV/JSON leaderboards, plots).

Entry point: :func:`build_report` reads a runs folder and writes ``report.html`` (self-contained),
``report.md`` (+ ``report_files/``), ``leaderboard.csv`` and ``leaderboard.json``.
"""

from featcache.report.build import ReportOptions, ReportResult, build_report

__all__ = ["ReportOptions", "ReportResult", "build_report"]
