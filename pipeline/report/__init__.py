"""The audit's HTML report: ``python -m pipeline.report`` (see :mod:`pipeline.report.stage`;
its template is ``templates/report.html.j2``).
"""

from pipeline.report.stage import (
    RunResults,
    flagged_prompts,
    load_run,
    load_thumbnail,
    rates_by_duplicates,
    run_report,
    write_report,
)

__all__ = ["RunResults", "flagged_prompts", "load_run", "load_thumbnail", "rates_by_duplicates", "run_report", "write_report"]
