"""report.html: the whole report in one page that needs no network. The sweep-level figures are embedded (base64
PNG); each run's card links to the images in its own run folder, relative to the page, so a report of 500 runs
stays small. The tables are the Markdown report's (results.md) rendered by Python-Markdown."""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import markdown

from fetalssl.report.collect import RunRecord, SweepResults

HTML_FILE = "report.html"
RUN_IMAGES = ("confusion_matrix.png", "reliability.png", "saliency.png")
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
strong { color: #0a5; }
img { max-width: 100%; }
details.run { border: 1px solid #ddd; border-radius: 4px; margin: 0.3em 0; padding: 0.3em 0.6em; }
details.run.failed { border-color: #c33; }
details.run img { max-height: 260px; margin-right: 0.5em; }
.figures img { display: block; margin: 1em 0; }
"""


def embedded_png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _run_card(record: RunRecord, page_dir: Path) -> str:
    payload = json.loads(record.path.read_text())
    grid = payload.get("grid", {})
    title = ", ".join(f"{k}={grid[k]}" for k in ("init", "method", "fraction", "finetune_mode", "seed")
                      if grid.get(k) is not None)
    facts: list[tuple[str, Any]] = [("run folder", record.out_dir)]
    if record.status != "ok":
        facts.append(("error", payload.get("error", "")))
    else:
        test = payload.get("test", {})
        facts += [("test macro-F1 / balanced accuracy / accuracy",
                   " / ".join(f"{test[k]:.3f}" for k in ("macro_f1", "balanced_accuracy", "accuracy") if k in test)),
                  ("training images", f"{payload.get('train_size')} {payload.get('train_class_counts', '')}")]
        calibration = payload.get("calibration")
        if calibration:
            scaled = (f"; {calibration['ece_scaled']:.3f} after temperature {calibration['temperature']:.2f}"
                      if "temperature" in calibration else "")
            facts.append(("test ECE", f"{calibration['ece']:.3f}{scaled}"))
        weights = payload.get("init_weights")
        if weights:
            facts.append(("init weights", f"{weights.get('path')} (sha256 {str(weights.get('sha256'))[:16]}…)"))
        facts.append(("grid", ", ".join(f"{k}={v}" for k, v in sorted(grid.items()))))
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    images = "".join(
        f'<img src="{html.escape(os.path.relpath(record.out_dir / name, page_dir))}" alt="{html.escape(name)}">'
        for name in RUN_IMAGES if (record.out_dir / name).is_file())
    state = "ok" if record.status == "ok" else "failed"
    return (f'<details class="run {state}"><summary>{html.escape(title)} ({state})</summary>'
            f"<table>{rows}</table>{images}</details>")


def write_html_report(markdown_text: str, figures: Sequence[Path], results: SweepResults, path: Path) -> None:
    """The Markdown report (tables with the best mean per column in bold, comparisons, missing and failed
    runs), the sweep's figures embedded, and one card per run."""
    body = markdown.markdown(markdown_text, extensions=["tables"])
    figures_html = "".join(f'<img src="{embedded_png(f)}" alt="{html.escape(f.name)}">' for f in figures)
    runs = sorted([*results.ok, *results.failed], key=lambda r: str(r.out_dir))
    cards = "".join(_run_card(r, path.parent) for r in runs)
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>fetalssl report: "
            f"{html.escape(str(results.root))}</title><style>{STYLE}</style></head><body>{body}"
            f"<h2>Figures</h2><div class='figures'>{figures_html}</div>"
            f"<h2>Runs ({len(runs)})</h2>{cards}</body></html>")
    path.write_text(page, encoding="utf-8")
