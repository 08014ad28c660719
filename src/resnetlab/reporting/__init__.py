"""Reporting: plots, ``report.md``/``report.html`` and run comparisons, rendered from run-directory files."""

from resnetlab.reporting.compare import compare_runs
from resnetlab.reporting.report import render_report

__all__ = ["compare_runs", "render_report"]
