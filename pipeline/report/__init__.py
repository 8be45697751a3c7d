"""The audit's HTML report: ``python -m pipeline.report`` (see :mod:`pipeline.report.stage`;
its template is ``templates/report.html.j2``).
"""

from pipeline.report.figures import load_thumbnail, plot_rates, png_data_uri
from pipeline.report.render import render_report, write_report
from pipeline.report.results import RunResults, load_run, shell_word
from pipeline.report.stage import ReportSettings, ReportSummary, WriteReport, run, run_report
from pipeline.report.tables import extracted_prompts, flagged_prompts, prompt_table, rates_by_duplicates

__all__ = [
    "ReportSettings",
    "ReportSummary",
    "RunResults",
    "WriteReport",
    "extracted_prompts",
    "flagged_prompts",
    "load_run",
    "load_thumbnail",
    "plot_rates",
    "png_data_uri",
    "prompt_table",
    "rates_by_duplicates",
    "render_report",
    "run",
    "run_report",
    "shell_word",
    "write_report",
]
