"""Reports of runs and sweeps: collecting results, tables (Markdown, LaTeX, CSV), the HTML report and
the statistics they show."""
