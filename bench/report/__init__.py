"""Reports: the analysis of a stored run (analysis.py), its tables (tables.py) and its figures (figures.py)."""
from __future__ import annotations

from pathlib import Path

from dpmem.bench.report import figures, tables
from dpmem.bench.report.analysis import Analysis


def write_all(analysis: Analysis, out: Path) -> None:
    """Every table and figure of a run into ``out``."""
    tables.write_tables(analysis, out)
    figures.write_figures(analysis, out)
