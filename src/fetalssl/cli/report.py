"""fetalssl-report: tables and figures from a fine-tuning sweep directory.

    fetalssl-report multirun/2024-06-01/12-00-00 --out report/ --metric macro_f1 balanced_accuracy

Writes results.csv (mean, sample std, n per cell and metric), runs.csv (one row per run), results.md
(tables per finetune mode + missing/failed runs), <metric>_vs_fraction.png (f1_vs_fraction.png for
macro-F1) and confusion_grid.png, and prints the Markdown to stdout. Each `--compare A B` (row labels as in
the tables, e.g. `--compare hog ssl:barlowtwins`; `hog@linear ssl:barlowtwins@full` across modes) adds B - A
per mode and fraction with a paired bootstrap interval over the test patients (comparisons.csv and a section
of results.md): is a difference larger than what the choice of test patients alone would give? Runs fine-tuned
over a pretraining sweep (init.pretrain_sweep) are also plotted against their pretraining setting
(<metric>_vs_pretraining.png), and every setting is compared with the largest one without being asked.
Exit status: 0 ok, 1 nothing usable found (no metrics.json, or no successful run), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from fetalssl.report.bootstrap import compare, markdown_comparisons, split_side, write_comparisons_csv
from fetalssl.report.collect import METRIC_SECTIONS, collect_sweep
from fetalssl.report.embeddings import KNN_K, collect_embeddings, plot_embeddings, write_embedding_summary
from fetalssl.report.html import HTML_FILE, write_html_report
from fetalssl.report.plots import plot_confusion_grid, plot_metric_vs_fraction, sum_confusions
from fetalssl.report.pretraining import comparison_pairs, plot_metric_vs_pretraining, pretraining_keys
from fetalssl.report.tables import (
    aggregate,
    make_labeller,
    render_markdown,
    write_results_csv,
    write_runs_csv,
)

DEFAULT_METRIC = "test.macro_f1"
VIDEO_METRIC = "test_video.macro_f1"  # tabulated too when the runs report video-level scores
CALIBRATION_METRIC = "calibration.ece"  # and the test ECE, when the runs report it
TSNE_SEED = 0  # the same maps for the same runs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fetalssl-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="directory searched recursively for metrics.json")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: SWEEP_DIR/report)")
    parser.add_argument("--metric", nargs="+", default=None,
                        help=f"metrics to tabulate and plot; a bare name means test.<name> "
                             f"(default: {DEFAULT_METRIC}, plus {VIDEO_METRIC} and {CALIBRATION_METRIC} when "
                             "present; also calibration.ece_scaled, calibration.temperature)")
    parser.add_argument("--compare", nargs=2, action="append", default=[], metavar=("A", "B"),
                        help="init labels to compare (B - A) within each finetune mode, e.g. hog ssl:barlowtwins, "
                             "or across modes as LABEL@MODE, e.g. hog@linear ssl:barlowtwins@full; repeatable")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples per comparison")
    parser.add_argument("--cm-fraction", type=float, nargs="+", default=None,
                        help="label fractions shown in confusion_grid.png (default: all)")
    return parser


def resolve_metric(name: str) -> str:
    """"macro_f1" -> "test.macro_f1"; dotted names starting with a metrics section are kept."""
    return name if name.split(".", 1)[0] in METRIC_SECTIONS else f"{METRIC_SECTIONS[0]}.{name}"


def plot_filename(metric: str) -> str:
    return "f1_vs_fraction.png" if metric == DEFAULT_METRIC else f"{metric.replace('.', '_')}_vs_fraction.png"


def score(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"  # undefined on a tiny test set (report/embeddings.py)


def markdown_embeddings(rows: Sequence[dict]) -> str:
    lines = ["## Frozen features of the test images (embeddings.png)", "",
             f"| init | images | {KNN_K}-NN accuracy (leave-one-out) | silhouette (cosine) |", "|---|---:|---:|---:|"]
    lines += [f"| {r['init']} | {r['images']} | {score(r['knn_accuracy'])} | {score(r['silhouette'])} |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.sweep_dir.is_dir():
        print(f"fetalssl-report: error: {args.sweep_dir} is not a directory", file=sys.stderr)
        return 2
    results = collect_sweep(args.sweep_dir)
    if results.n_metrics_files == 0:
        print(f"fetalssl-report: error: no metrics.json found under {args.sweep_dir} "
              f"({len(results.incomplete)} run dirs without one)", file=sys.stderr)
        return 1

    available = {m for r in results.ok for m in r.metrics}
    if args.metric is None:
        metrics = [DEFAULT_METRIC] + [m for m in (VIDEO_METRIC, CALIBRATION_METRIC) if m in available]
    else:
        metrics = [resolve_metric(m) for m in args.metric]
    unknown = [m for m in metrics if results.ok and m not in available]
    if unknown:
        print(f"fetalssl-report: error: metric(s) {', '.join(unknown)} not in any run; "
              f"available: {', '.join(sorted(available))}", file=sys.stderr)
        return 2

    out = args.out if args.out is not None else args.sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    cells = aggregate(results.ok)
    markdown = render_markdown(cells, results, metrics)
    written = [out / "results.csv", out / "runs.csv", out / "results.md"]
    two_level = bool(results.ok) and bool(pretraining_keys(results.ok))
    if two_level:  # every pretraining setting against the largest, at equal label fraction
        args.compare += [list(pair) for pair in comparison_pairs(results.ok, make_labeller(results.ok))]
    if args.compare:
        labeller, labels = make_labeller(results.ok), {c.label for c in cells}
        unknown = sorted({split_side(side)[0] for pair in args.compare for side in pair} - labels)
        if unknown:
            print(f"fetalssl-report: error: --compare label(s) {', '.join(unknown)} not in the results; "
                  f"labels: {', '.join(sorted(labels))}", file=sys.stderr)
            return 2
        comparisons = []
        for a, b in args.compare:
            try:
                found = compare(results.ok, labeller, a, b, metrics, args.resamples)
            except ValueError as err:
                print(f"fetalssl-report: error: --compare {a} {b}: {err}", file=sys.stderr)
                return 1
            if not found:
                print(f"fetalssl-report: error: --compare {a} {b}: no label fraction where both have runs "
                      f"(in the same finetune mode unless given as LABEL@MODE)", file=sys.stderr)
                return 2
            comparisons += found
        markdown += "\n" + markdown_comparisons(comparisons) + "\n"
        written.append(out / "comparisons.csv")
        write_comparisons_csv(comparisons, written[-1])
    embeddings = collect_embeddings(results.ok, lambda record: make_labeller(results.ok)(record.grid))
    if embeddings:  # frozen-backbone runs left their test features: how each init separates the classes
        written += [out / "embeddings.png", out / "embeddings.csv"]
        rows = plot_embeddings(embeddings, written[-2], seed=TSNE_SEED)
        write_embedding_summary(rows, written[-1])
        markdown += "\n" + markdown_embeddings(rows) + "\n"
    write_results_csv(cells, written[0])
    write_runs_csv(results.ok, results.root, written[1])
    written[2].write_text(markdown)
    if results.ok:
        for metric in metrics:
            written.append(out / plot_filename(metric))
            plot_metric_vs_fraction(cells, metric, written[-1])
            if two_level:
                written.append(out / f"{metric.replace('.', '_')}_vs_pretraining.png")
                plot_metric_vs_pretraining(results.ok, metric, written[-1])
        confusions = sum_confusions(results.ok, make_labeller(results.ok), args.cm_fraction)
        if confusions:
            written.append(out / "confusion_grid.png")
            plot_confusion_grid(confusions, written[-1])
        else:
            logging.getLogger(__name__).warning("no readable confusion_matrix.csv, confusion_grid.png not written")

    written.append(out / HTML_FILE)
    write_html_report(markdown, [p for p in written if p.suffix == ".png"], results, written[-1])
    print(markdown)
    print("Wrote:\n" + "\n".join(f"  {path}" for path in written))
    print(f"The report in a browser: {written[-1]}")
    if not results.ok:
        print(f"fetalssl-report: error: no successful run under {args.sweep_dir} "
              f"({len(results.failed)} failed, {len(results.malformed)} malformed)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
