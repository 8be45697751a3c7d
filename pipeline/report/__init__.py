"""The audit's HTML report: ``python -m pipeline.report`` (see :mod:`pipeline.report.stage`;
its template is ``templates/report.html.j2``).
"""

from pipeline.report.stage import (
    RunResults,
    extracted_prompts,
    flagged_prompts,
    load_run,
    load_thumbnail,
    prompt_table,
    rates_by_duplicates,
    run_report,
    shell_word,
    write_report,
)

__all__ = [
    "RunResults",
    "extracted_prompts",
    "flagged_prompts",
    "load_run",
    "load_thumbnail",
    "prompt_table",
    "rates_by_duplicates",
    "run_report",
    "shell_word",
    "write_report",
]
