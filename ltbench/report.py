"""Static HTML reports of a run directory or of a runs folder: one file, no server, no JavaScript.

A run's report (`<run>/report.html`, written by `ltbench run` at the end) holds the High / Low /
All table, a per-class bar chart of image and pixel AUROC in the split's class order with each
class's training-image count on the axis, the per-class table, the overlays the run wrote
(highest-scoring anomalies and normal image of each class, with their heat maps), the
configuration and the command that reruns it. A runs folder's report holds the leaderboard
tables (as `ltbench leaderboard`), per-class tables, each model's per-class AUROC against the
class's training-image count, and links to each run's report. Charts are inline SVG
(`ltbench.report_svg`); images are linked beside the page or embedded as data URIs.
"""

from __future__ import annotations

import base64
import csv
import json
import os
from dataclasses import dataclass
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any

from ltbench import __version__, io
from ltbench.errors import LTBenchError, RunError
from ltbench.leaderboard import MISSING, Table, build_leaderboard, collect_runs, format_fraction
from ltbench.metrics import _COLUMN_TITLES as METRIC_TITLES
from ltbench.metrics import _SUMMARY_COLUMNS as SUMMARY_COLUMNS
from ltbench.report_svg import class_bar_chart, count_scatter_chart
from ltbench.rundir import CONFIG_FILE, MAPS_DIR, METRICS_FILE, SCORES_FILE, read_run_record

REPORT_FILE = "report.html"
GROUP_TITLES = {"all": "All", "high": "High (majority)", "low": "Low (minority)"}

CSS = """
:root { --ink: #1b1f24; --muted: #5a6270; --rule: #d0d5dc; --band: #f4f6f8; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; color: var(--ink);
       max-width: 1100px; margin: 24px auto; padding: 0 20px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 28px 0 8px; border-bottom: 2px solid var(--rule); }
h3 { font-size: 15px; margin: 18px 0 6px; }
.meta, .note, figcaption { color: var(--muted); font-size: 12.5px; }
table { border-collapse: collapse; margin: 6px 0 14px; font-size: 13px; }
th, td { padding: 3px 9px; border-bottom: 1px solid var(--rule); text-align: left; vertical-align: top; }
th { background: var(--band); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.group-high td:first-child { border-left: 4px solid #1f77b4; } tr.group-low td:first-child { border-left: 4px solid #ff7f0e; }
.chart { overflow-x: auto; margin: 8px 0 4px; } .chart svg { max-width: 100%; height: auto; }
.overlays, .charts { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0 0 8px; width: 340px; max-width: 100%; break-inside: avoid; }
figure img { width: 100%; border: 1px solid var(--rule); }
pre { background: var(--band); padding: 8px 10px; overflow-x: auto; white-space: pre-wrap; word-break: break-all; font-size: 12px; }
.wide { overflow-x: auto; }
@page { size: A4; margin: 14mm 12mm; }
@media print {
  body { max-width: none; margin: 0; padding: 0; font-size: 10.5pt; }
  h2, h3 { break-after: avoid; } table, figure, .chart, .keep { break-inside: avoid; }
  table { font-size: 8.5pt; } th, td { padding: 2px 5px; }
  .wide, .chart { overflow: visible; } figure { width: 58mm; }
  a { color: inherit; text-decoration: none; }
}
"""


# ----------------------------------------------------------------------------- reading a run


@dataclass
class RunFiles:
    """What a finished run directory holds, as the report needs it."""

    run_dir: Path
    record: dict[str, Any]                   # config.json
    metrics: dict[str, Any]                  # metrics.json
    scores: list[dict[str, str]]             # scores.csv rows
    train_counts: dict[str, int] | None      # training images per class, None when unknown
    counts_note: str                         # why the counts are unknown ("" when known)


def training_counts(record: dict[str, Any]) -> tuple[dict[str, int] | None, str]:
    """Training images per class of a run's split, from its manifest (built from the root for DAGM pins).

    Returns: (class -> count, "") or (None, a sentence saying why they are unknown).
    """
    from ltbench.splits import load_manifest, open_split

    source = record.get("split_source", record["split"])
    try:
        manifest = load_manifest(source)
        if manifest.recipe_only:
            manifest, _ = open_split(source, record.get("root"))
    except LTBenchError as exc:
        return None, f"training-image counts unavailable: {exc}"
    if manifest.csv_sha256 != record.get("manifest_csv_sha256"):
        return None, f"training-image counts unavailable: the manifest {source} changed since the run"
    return dict(manifest.counts), ""


def read_run(run_dir: str | os.PathLike) -> RunFiles:
    """Read a finished run directory; raises `RunError` naming the missing or damaged file."""
    run_dir = Path(run_dir)
    record = read_run_record(run_dir)
    path = run_dir / METRICS_FILE
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path} is missing: {run_dir} is not a finished run (finish it with ltbench run --resume)") from None
    except json.JSONDecodeError as exc:
        raise RunError(f"{path} is not valid JSON ({exc}); the run directory is damaged") from None
    scores_path = run_dir / SCORES_FILE
    scores = list(csv.DictReader(scores_path.open(encoding="utf-8", newline=""))) if scores_path.is_file() else []
    counts, note = training_counts(record)
    return RunFiles(run_dir, record, metrics, scores, counts, note)


# ----------------------------------------------------------------------------- HTML pieces


class Raw(str):
    """A table cell that is already HTML (a link); every other cell is escaped."""


def html_table(columns: list[str], rows: list[list[str]], numeric_from: int = 1, numeric_to: int | None = None,
               row_classes: list[str] | None = None, caption: str = "") -> str:
    """A table; columns `numeric_from` to `numeric_to` (exclusive; None: the last) are right-aligned numbers."""
    def num(i: int) -> str:
        return " class=num" if i >= numeric_from and (numeric_to is None or i < numeric_to) else ""

    head = "".join(f"<th{num(i)}>{escape(c)}</th>" for i, c in enumerate(columns))
    body = []
    for r, row in enumerate(rows):
        cls = f' class="{row_classes[r]}"' if row_classes else ""
        cells = "".join(f"<td{num(i)}>{c if isinstance(c, Raw) else escape(str(c))}</td>" for i, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    caption_html = f"<caption class=note>{escape(caption)}</caption>" if caption else ""
    return f'<div class="wide"><table>{caption_html}<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def image_source(png: Path, page_dir: Path, embed: bool) -> str:
    """An `<img src>`: a data URI (`embed`), else the path relative to the page's folder."""
    if embed:
        return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")
    return Path(os.path.relpath(png, page_dir)).as_posix()


def page(title: str, body: list[str]) -> str:
    """A complete HTML document: the title, the stylesheet inline, the body parts in order."""
    stamp = datetime.now().isoformat(timespec="seconds")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(body)
            + f'\n<p class="meta">Made by LTBench {escape(__version__)} on {stamp}.</p>\n</body></html>\n')


def _metric_cells(values: dict[str, Any], keys: tuple[str, ...] = SUMMARY_COLUMNS) -> list[str]:
    return [format_fraction(values.get(key)) for key in keys]


# ----------------------------------------------------------------------------- a run


def summary_section(run: RunFiles) -> list[str]:
    """The High / Low / All table in percent, as `ltbench run` prints it."""
    per_class = run.metrics["per_class"]
    counts = {"all": len(per_class), **{g: sum(1 for v in per_class.values() if v["group"] == g) for g in ("high", "low")}}
    rows = [[f"{GROUP_TITLES[g]}, {counts[g]} class{'es' if counts[g] != 1 else ''}",
             *_metric_cells(run.metrics["summary"].get(g, {}))]
            for g in ("all", "high", "low")]
    return ["<h2 id=summary>Summary: All, High and Low classes</h2>",
            ('<p class="note">Means of the per-class values, in %. High: the first half of the split\'s class '
            "order (most training images); Low: the rest.</p>"),
            html_table(["group", *(METRIC_TITLES[k] for k in SUMMARY_COLUMNS)], rows)]


def per_class_section(run: RunFiles) -> list[str]:
    """The bar chart of image and pixel AUROC per class, then the per-class table."""
    per_class = run.metrics["per_class"]
    classes = [c for c in run.record.get("class_order", per_class) if c in per_class]
    counts = run.train_counts or {}
    chart = class_bar_chart(classes, [per_class[c]["group"] for c in classes], [counts.get(c) for c in classes],
                            [per_class[c].get("image_auroc") for c in classes],
                            [per_class[c].get("pixel_auroc") for c in classes],
                            f"Image and pixel AUROC per class, {run.metrics['split']}")
    rows = [[c, per_class[c]["group"], str(counts[c]) if c in counts else MISSING, *_metric_cells(per_class[c])]
            for c in classes]
    parts = ["<h2 id=per-class>Per class</h2>",
             ('<p class="note">Classes in the split\'s order (most training images first); the number after each '
             "class name is its training images. Solid bars: image AUROC; light bars: pixel AUROC.</p>"),
             f'<div class="chart">{chart}</div>']
    if run.counts_note:
        parts.append(f'<p class="note">{escape(run.counts_note)}</p>')
    parts.append(html_table(["class", "group", "training images", *(METRIC_TITLES[k] for k in SUMMARY_COLUMNS)],
                            rows, numeric_from=2, row_classes=[f"group-{per_class[c]['group']}" for c in classes]))
    return parts


def _overlay_caption(png: Path, rows: dict[str, tuple[int, dict[str, str]]], total: int) -> str:
    """"anomaly (crack), 005.png: score 0.8123, rank 1 of 20" from the scores.csv row the overlay shows."""
    found = rows.get(png.stem)
    if found is None:
        return png.stem
    rank, row = found
    kind = "normal" if row["label"] == "0" else f"anomaly ({row['defect_type']})"
    return f"{kind}, {Path(row['image']).name}: score {float(row['score']):.4g}, rank {rank} of {total} by score"


def overlays_section(run: RunFiles, page_dir: Path, embed: bool) -> list[str]:
    """Per class, the overlay PNGs the run wrote (image | ground truth | heat map), anomalies first."""
    maps = run.run_dir / MAPS_DIR
    parts = ["<h2 id=maps>Anomaly maps</h2>",
             ('<p class="note">For each class, the test images the run drew: its highest-scoring anomalies and its '
             "highest-scoring normal image. Each shows the image, the ground truth and the heat map over the image, "
             "on one colour scale per class.</p>")]
    if not maps.is_dir():
        return parts + ['<p class="note">This run wrote no overlays (rerun with --overlays N to draw some).</p>']
    for class_name in [c for c in run.record.get("class_order", []) if (maps / c).is_dir()]:
        mine = [row for row in run.scores if row["class_name"] == class_name]
        ranked = sorted(mine, key=lambda row: -float(row["score"]))
        rows = {f"{row['defect_type']}_{Path(row['image']).stem}": (rank, row) for rank, row in enumerate(ranked, 1)}
        pngs = sorted((maps / class_name).glob("*.png"),
                      key=lambda p: (rows[p.stem][1]["label"] == "0", rows[p.stem][0]) if p.stem in rows else (True, 0))
        figures = [f'<figure><img src="{image_source(p, page_dir, embed)}" alt="{escape(class_name)}: {escape(p.stem)}">'
                   f"<figcaption>{escape(_overlay_caption(p, rows, len(ranked)))}</figcaption></figure>" for p in pngs]
        parts.append(f'<section class="keep"><h3>{escape(class_name)}</h3><div class="overlays">{"".join(figures)}</div>'
                     "</section>")
    return parts


def rerun_command(record: dict[str, Any]) -> str:
    """The command that reruns a run: the recorded command line, else one built from its model, split and seed."""
    if record.get("command"):
        return record["command"]
    return (f"ltbench run --model {record['model']} --split {record.get('split_source', record['split'])} "
            f"--seed {record['seed']} --config config.json  # config.json: the detector config below")


def config_section(run: RunFiles) -> list[str]:
    """The command line that reruns the run, the detector config and the recorded setting."""
    record = run.record
    facts = [["model", f"{record['model']} ({record['detector']})"], ["split", record["split"]],
             ["manifest sha256", str(record.get("manifest_csv_sha256"))], ["data root", str(record.get("root"))],
             ["preset", str(record.get("preset"))], ["seed", str(record["seed"])],
             ["device", str(record.get("device"))], ["started", str(record.get("started"))],
             ["versions", ", ".join(f"{k} {v}" for k, v in record.get("versions", {}).items())]]
    return ["<h2 id=config>Configuration</h2>",
            (f'<section class="keep"><h3>Command line to rerun it</h3><pre class="command">{escape(rerun_command(record))}'
            "</pre></section>"),
            html_table(["setting", "value"], facts, numeric_from=99), "<h3>Detector config</h3>",
            f'<pre class="config">{escape(json.dumps(record["config"], indent=2))}</pre>']


def render_run_report(run: RunFiles, page_dir: Path, embed: bool = False) -> str:
    """The HTML of a run's report, its images referenced from `page_dir` (or embedded)."""
    record = run.record
    title = f"{run.metrics['model']} on {run.metrics['split']}"
    body = [f"<h1>{escape(title)}</h1>",
            (f'<p class="meta">Run {escape(run.run_dir.name)}, started {escape(str(record.get("started")))}, '
            f'seed {escape(str(record["seed"]))}, device {escape(str(record.get("device")))}. '
            '<a href="#summary">Summary</a> · <a href="#per-class">Per class</a> · <a href="#maps">Anomaly maps</a> · '
            '<a href="#config">Configuration</a></p>')]
    body += summary_section(run) + per_class_section(run) + overlays_section(run, page_dir, embed) + config_section(run)
    return page(f"LTBench: {title}", body)


def write_run_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                     embed_images: bool = False) -> Path:
    """Write a run's report (default `<run_dir>/report.html`) atomically; returns its path."""
    run = read_run(run_dir)
    out = Path(out) if out is not None else run.run_dir / REPORT_FILE
    io.write_text(out, render_run_report(run, out.resolve().parent, embed_images))
    return out


# ----------------------------------------------------------------------------- a runs folder


def _transposed(table: Table, counts: dict[str, int] | None) -> str:
    """A per-class leaderboard table turned so that methods are columns and groups/classes rows."""
    methods = [row[0] for row in table.rows]
    labels = table.columns[1:]
    rows = []
    for j, label in enumerate(labels, start=1):
        count = str(counts[label]) if counts and label in counts else ("" if label in ("All", "High", "Low") else MISSING)
        rows.append([label, count, *(row[j] for row in table.rows)])
    return html_table(["class", "training images", *methods], rows, numeric_from=1, caption=table.title)


def render_runs_report(runs_dir: Path, page_dir: Path, dataset: str | None = None,
                       with_paper: bool = False) -> tuple[str, list[Path]]:
    """The HTML of a runs folder's report and the run reports it links to (written where missing)."""
    runs, _ = collect_runs(runs_dir, dataset)
    summary = build_leaderboard(runs_dir, dataset=dataset, with_paper=with_paper)
    detailed = build_leaderboard(runs_dir, dataset=dataset, per_class=True, with_paper=with_paper)
    title = f"LTBench runs in {runs_dir}" + (f" ({dataset})" if dataset else "")
    body = [f"<h1>{escape(title)}</h1>",
            (f'<p class="meta">{len(runs)} finished runs (the latest of each model and split). '
            '<a href="#runs">Runs</a> · <a href="#leaderboard">Leaderboard</a> · <a href="#per-class">Per class</a></p>')]
    for note in summary.notes:  # superseded runs, datasets the paper does not report
        body.append(f'<p class="note">Note: {escape(note)}</p>')

    linked: list[Path] = []
    rows = []
    for entry in runs:
        report = entry.run_dir / REPORT_FILE
        if not report.is_file():
            write_run_report(entry.run_dir)
        linked.append(report)
        href = escape(Path(os.path.relpath(report, page_dir)).as_posix())
        rows.append([entry.model, entry.split,
                     *(format_fraction(entry.summary.get(g, {}).get(metric))
                       for metric in ("image_auroc", "pixel_auroc") for g in ("all", "high", "low")),
                     Raw(f'<a href="{href}">{escape(entry.run_dir.name)}</a>')])
    body += ["<h2 id=runs>Runs</h2>", ('<p class="note">Values in %. Each run\'s own report has its per-class '
             "chart, anomaly maps and configuration.</p>"),
             html_table(["model", "split", "image AUROC All", "High", "Low", "pixel AUROC All", "High", "Low",
                         "report"], rows, numeric_from=2, numeric_to=8)]

    body.append("<h2 id=leaderboard>Leaderboard</h2>")
    body.append('<p class="note">As <code>ltbench leaderboard</code> prints it: the mean over all classes, in %'
                + ("; (reported): the LTAD paper's published numbers." if with_paper else ".") + "</p>")
    for table in summary.tables:
        body += [f"<h3>{escape(table.title)}</h3>", html_table(table.columns, table.rows, numeric_from=2)]

    body.append("<h2 id=per-class>Per class</h2>")
    by_split = {entry.split: [] for entry in runs}
    for entry in runs:
        by_split[entry.split].append(entry)
    for split, entries in by_split.items():
        counts, note = training_counts(read_run_record(entries[0].run_dir))
        dataset_name, config = split.split("/", 1)
        body.append(f"<h3>{escape(split)}</h3>")
        if note:
            body.append(f'<p class="note">{escape(note)}</p>')
        if counts:
            charts = []
            for metric, label in (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC")):
                series = {e.model: {c: v.get(metric) for c, v in e.per_class.items()} for e in entries}
                charts.append(count_scatter_chart(counts, series, label,
                                                  f"{label} per class against training images, {split}"))
            body.append(f'<div class="charts">{"".join(f"<div class=chart>{c}</div>" for c in charts)}</div>')
        for table in detailed.tables:
            if table.keys.get("dataset") == dataset_name and table.keys.get("config") == config:
                body.append(_transposed(table, counts))
    return page(title, body), linked


def write_runs_report(runs_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                      dataset: str | None = None, with_paper: bool = False) -> tuple[Path, list[Path]]:
    """Write a runs folder's report (default `<runs_dir>/report.html`); returns it and the run reports it links."""
    runs_dir = Path(runs_dir)
    out = Path(out) if out is not None else runs_dir / REPORT_FILE
    html, linked = render_runs_report(runs_dir, out.resolve().parent, dataset, with_paper)
    io.write_text(out, html)
    return out, linked


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is one run directory (it holds config.json and metrics.json) rather than a runs folder."""
    return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / METRICS_FILE).is_file()
