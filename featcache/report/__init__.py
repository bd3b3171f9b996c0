"""Report rendering (HTML, Markdown, CSV/JSON leaderboards, plots)."""
