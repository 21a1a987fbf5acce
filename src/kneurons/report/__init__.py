"""Run reports: ``write_report(run_dir)`` writes a self-contained ``report.html`` (figures embedded as base64 PNG,
no script, no external resource), each figure as a PNG file and ``summary.json``; ``summary(run_dir)`` returns the
key numbers beside the paper's (``summary(...)["compare"]``: one row per quantity with ``ours`` and ``paper``),
``format_summary`` prints them as a text table.

How the numbers are averaged, and which rows are left out, is in :mod:`kneurons.report.numbers`.
"""

from .numbers import format_summary, summary
from .render import write_report

__all__ = ["write_report", "summary", "format_summary"]
