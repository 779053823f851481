"""The report of a pipeline run: DIR/report.md, DIR/report.json and DIR/plots/*.png.

    lmschool report runs/demo            # `lmschool run` calls build_report(DIR) at its end

It reads only what the stages left in DIR and runs no model: collect.py gathers the figures into
report.json's shape, plots.py draws the plots (matplotlib, imported only to draw), markdown.py
writes report.md. Which stages there are, their directories, files, kinds and titles come from the
pipeline's registry (lmschool/pipeline.py).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from lmschool.data.prompts import SIDE_BY_SIDE
from lmschool.errors import UserError
from lmschool.files import atomic_write_text
from lmschool.report.collect import collect, side_by_side_answers
from lmschool.report.markdown import render_markdown
from lmschool.report.plots import draw_plots


def build_report(run_dir: Path, *, samples: int = SIDE_BY_SIDE) -> dict:
    """Write DIR/report.json, DIR/report.md and DIR/plots/*.png; return the report dict."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory; give the --out directory of `lmschool run`")
    if not os.access(run_dir, os.W_OK):
        raise UserError(f"{run_dir} is not writable; the report is written inside it")
    report = collect(run_dir, created=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    report["plots"] = draw_plots(run_dir, report["frontier"])
    report["samples"] = side_by_side_answers(run_dir, samples)
    atomic_write_text(run_dir / "report.json",
                      json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    atomic_write_text(run_dir / "report.md", render_markdown(report) + "\n")
    return report
