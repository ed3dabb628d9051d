"""`ltbench report` and the report.html of `ltbench run`, checked with an HTML parser against the run's files."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
from click.testing import CliRunner

from ltbench.cli import main
from ltbench.datasets.folder import read_catalog
from ltbench.leaderboard import build_leaderboard, format_fraction
from ltbench.metrics import _SUMMARY_COLUMNS as SUMMARY_COLUMNS
from ltbench.plots import HIGH_COLOUR, LOW_COLOUR
from ltbench.report_svg import PIXEL_TINT, PLOT_HEIGHT, tint
from ltbench.runner import RunOptions, run
from ltbench.splits import build_split
from tests.fakes import make_spot_tree

TESTS = Path(__file__).resolve().parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """The parts of a report the tests read: tables, images, links, chart bars, headings, scripts."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: list[dict] = []       # {"caption", "head": [..], "rows": [[..]]}
        self.images: list[str] = []
        self.links: list[str] = []
        self.bars: list[dict] = []         # rect.bar: attributes + "title"
        self.headings: list[tuple[str, str]] = []
        self.scripts = 0
        self.pre: list[str] = []
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self._text: list[str] | None = None
        self._where = ""
        self._bar: dict | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append({"caption": "", "head": [], "rows": []})
        elif tag in ("td", "th", "caption", "h1", "h2", "h3", "pre", "title"):
            self._text, self._where = [], tag
        elif tag == "tr":
            self._row = []
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "a":
            self.links.append(attrs["href"])
        elif tag == "rect" and attrs.get("class") == "bar":
            self._bar = attrs
        elif tag == "script":
            self.scripts += 1

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        text = "".join(self._text or []).strip()
        if tag in ("td", "th") and self._row is not None:
            self._row.append(text)
        elif tag == "tr" and self._row is not None:
            table = self.tables[-1]
            if table["head"] or self._row and self._where == "td":
                table["rows"].append(self._row)
            else:
                table["head"] = self._row
            self._row = None
        elif tag == "caption":
            self.tables[-1]["caption"] = text
        elif tag in ("h1", "h2", "h3"):
            self.headings.append((tag, text))
        elif tag == "pre":
            self.pre.append(text)
        elif tag == "title" and self._bar is not None:
            self.bars.append({**self._bar, "title": text})
            self._bar = None
        if tag in ("td", "th", "caption", "h1", "h2", "h3", "pre", "title"):
            self._text = None


def table_with(page: Page, first_header: str) -> dict:
    (table,) = [t for t in page.tables if t["head"] and t["head"][0] == first_header]
    return table


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished runs (two test detectors) on a 2-class split; returns (runs folder, [run dirs], manifest)."""
    base = tmp_path_factory.mktemp("report")
    root = make_spot_tree(base / "data")
    manifest = build_split(read_catalog(root), "exp", 2)
    manifest.write(base / "split" / "tiny.csv")
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(TESTS.parent))
    try:
        results = [run(RunOptions(model=f"tests.mean_detector:{name}", split=str(base / "split" / "tiny.csv"),
                                  root=str(root), out=base / "runs", device="cpu", progress=False,
                                  command=f"ltbench run --model tests.mean_detector:{name}"))
                   for name in ("MeanDetector", "ShiftedMeanDetector")]
    finally:
        mp.undo()
    return base / "runs", [r.run_dir for r in results], manifest


def test_run_report_numbers_equal_metrics_json(runs):
    _, (run_dir, _), manifest = runs
    metrics = json.loads((run_dir / "metrics.json").read_text())
    page = Page((run_dir / "report.html").read_text())   # written by `ltbench run` itself
    assert page.scripts == 0
    assert [h for h in page.headings if h[0] != "h3"] == [
        ("h1", f"tests.mean_detector:MeanDetector on {manifest.name}"), ("h2", "Summary: All, High and Low classes"),
        ("h2", "Per class"), ("h2", "Anomaly maps"), ("h2", "Configuration")]

    summary = table_with(page, "group")
    assert [row[0] for row in summary["rows"]] == ["All, 2 classes", "High (majority), 1 class", "Low (minority), 1 class"]
    for row, group in zip(summary["rows"], ("all", "high", "low")):
        assert row[1:] == [format_fraction(metrics["summary"][group][key]) for key in SUMMARY_COLUMNS]

    per_class = table_with(page, "class")
    assert [row[0] for row in per_class["rows"]] == manifest.class_order == ["alpha", "beta"]
    for row in per_class["rows"]:
        values = metrics["per_class"][row[0]]
        assert row[1] == values["group"] and row[2] == str(manifest.counts[row[0]])
        assert row[3:] == [format_fraction(values[key]) for key in SUMMARY_COLUMNS]


def test_run_report_bar_chart_in_class_order_coloured_by_group(runs):
    _, (run_dir, _), manifest = runs
    metrics = json.loads((run_dir / "metrics.json").read_text())
    html = (run_dir / "report.html").read_text()
    bars = Page(html).bars
    assert len(bars) == 2 * len(manifest.class_order)
    for i, class_name in enumerate(manifest.class_order):
        colour = HIGH_COLOUR if class_name in manifest.high else LOW_COLOUR
        group = "high" if class_name in manifest.high else "low"
        for j, (key, label, fill) in enumerate((("image_auroc", "image AUROC", colour),
                                                ("pixel_auroc", "pixel AUROC", tint(colour, PIXEL_TINT)))):
            bar = bars[2 * i + j]
            value = metrics["per_class"][class_name][key]
            assert bar["title"] == f"{class_name} ({group}): {label} {100 * value:.2f}%"
            assert bar["fill"] == fill
            assert float(bar["height"]) == pytest.approx(PLOT_HEIGHT * value, abs=0.01)
    # the training-image count sits beside each class name on the axis
    for class_name in manifest.class_order:
        assert f">{class_name} ({manifest.counts[class_name]})</text>" in html


def test_run_report_shows_every_overlay_and_the_rerun_command(runs):
    _, (run_dir, _), _ = runs
    page = Page((run_dir / "report.html").read_text())
    overlays = sorted(run_dir.glob("maps/*/*.png"))
    assert len(overlays) == 6  # 3 per class: the two highest-scoring anomalies and the highest-scoring normal
    assert sorted((run_dir / unquote(src)).resolve() for src in page.images) == [p.resolve() for p in overlays]
    assert all(not re.match(r"^[a-z]+://", src) for src in page.images + page.links)
    assert page.pre[0] == "ltbench run --model tests.mean_detector:MeanDetector"
    assert json.loads(page.pre[1]) == json.loads((run_dir / "config.json").read_text())["config"]


def test_report_command_embeds_images_into_one_portable_file(runs, tmp_path):
    _, (run_dir, _), _ = runs
    out = tmp_path / "elsewhere" / "one.html"
    result = CliRunner().invoke(main, ["report", str(run_dir), "--out", str(out), "--embed-images"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"Wrote {out}"
    page = Page(out.read_text())
    assert len(page.images) == 6
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)


def test_runs_folder_report_has_the_leaderboard_and_links_every_run(runs):
    runs_dir, run_dirs, manifest = runs
    result = CliRunner().invoke(main, ["report", str(runs_dir)])
    assert result.exit_code == 0, result.output
    page = Page((runs_dir / "report.html").read_text())
    assert page.scripts == 0
    assert sorted((runs_dir / href).resolve() for href in page.links if not href.startswith("#")) == sorted(
        (d / "report.html").resolve() for d in run_dirs)
    (board,) = build_leaderboard(runs_dir).tables
    rendered = table_with(page, "Config.")
    assert rendered["head"] == board.columns and rendered["rows"] == board.rows
    detailed = build_leaderboard(runs_dir, per_class=True).tables
    turned = [t for t in page.tables if t["caption"]]
    assert [t["caption"] for t in turned] == [t.title for t in detailed]
    for table, source in zip(turned, detailed):
        assert table["head"] == ["class", "training images", *(row[0] for row in source.rows)]
        assert [row[0] for row in table["rows"]] == ["All", "High", "Low", *manifest.class_order]
        for j, row in enumerate(table["rows"], start=1):
            assert row[2:] == [source_row[j] for source_row in source.rows]
        assert [row[1] for row in table["rows"][3:]] == [str(manifest.counts[c]) for c in manifest.class_order]
    # one chart point per model and class, for image and pixel AUROC
    html = (runs_dir / "report.html").read_text()
    assert html.count('class="point"') == 2 * 2 * len(manifest.class_order)


def test_no_report_flag_and_bad_paths(runs, tmp_path):
    runs_dir, _, _ = runs
    result = CliRunner().invoke(main, ["report", str(tmp_path / "nothing")])
    assert result.exit_code == 1
    assert result.stderr.strip() == (f"Error: {tmp_path / 'nothing'} does not exist: give a run directory or a "
                                     "runs folder made by ltbench run")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["report", str(empty)])
    assert result.exit_code == 1 and result.stderr.startswith(f"Error: no finished runs under {empty}")
    # `ltbench run --no-report` writes the run directory without report.html
    (run_dir, _), manifest_path = runs[1], runs_dir.parent / "split" / "tiny.csv"
    record = json.loads((run_dir / "config.json").read_text())
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(TESTS.parent))
        mp.setenv("TQDM_DISABLE", "1")
        result = CliRunner().invoke(main, ["run", "--model", "tests.mean_detector:MeanDetector", "--split",
                                           str(manifest_path), "--root", record["root"], "--out", str(tmp_path / "r"),
                                           "--device", "cpu", "--no-report"])
    assert result.exit_code == 0, result.output
    (finished,) = [p.parent for p in (tmp_path / "r").rglob("metrics.json")]
    assert not (finished / "report.html").exists() and "Report:" not in result.output
