"""`make report-check`: render the reports of a short synth run in headless Chromium and check the pictures.

Runs the test-suite detector `tests.mean_detector:MeanDetector` (a per-class mean image, seconds
to train) on `synth/exp100`, writes the run's report and the runs folder's report, then for each
page: takes a screenshot (PNG) and prints it to PDF with Chromium. Fails (exit 1) when a page
is blank, when the browser reports a console message (a script error, or an image the probe
below finds not loaded), or when the PDF is not A4. The reports themselves hold no JavaScript:
the probe goes into a temporary copy of each page, beside it so that relative image paths resolve.

Usage: python tools/report_check.py [--out DIR]   (default DIR: report-check/; PNGs and PDFs go there)
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.mean_detector and, in a checkout without an install, ltbench

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
PROBE = """<script>
window.addEventListener("load", () => {
  let broken = 0;
  for (const image of document.images) {
    if (!image.complete || image.naturalWidth === 0) { broken++; console.error("report-check error: image not loaded: " + image.getAttribute("src").slice(0, 80)); }
  }
  const charts = document.querySelectorAll("svg").length;
  console.log("report-check: " + document.images.length + " images (" + broken + " not loaded), " + charts + " charts, " + document.querySelectorAll("table").length + " tables, " + document.body.innerText.length + " characters of text");
});
</script>"""
A4_POINTS = (595.28, 841.89)
CONSOLE = re.compile(r":CONSOLE(?:\(\d+\)|:\d+)\] \"(.*)\", source:")


def find_browser() -> str:
    """The first headless Chromium on PATH; exits with the apt command when there is none."""
    for name in BROWSERS:
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("report-check: no Chromium found; install one with: apt-get install -y chromium-headless-shell")


def browse(browser: str, page: Path, *args: str) -> list[str]:
    """Load `page` in headless Chromium with `args`; returns the console messages it logged."""
    result = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                             "--enable-logging=stderr", "--log-level=0", *args, page.resolve().as_uri()],
                            capture_output=True, text=True, timeout=180, check=False)
    if result.returncode != 0:
        sys.exit(f"report-check: {browser} failed on {page} (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return CONSOLE.findall(result.stderr)


def blank_fraction(png: Path) -> float:
    """The fraction of pixels of a screenshot that are (near) white."""
    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.uint8)
    return float((pixels > 245).mean())


def pdf_pages(pdf: Path) -> tuple[int, list[tuple[float, float]]]:
    """Page count and page sizes (points) of a PDF Chromium printed."""
    data = pdf.read_bytes()
    boxes = re.findall(rb"/MediaBox\s*\[\s*0 0 ([\d.]+) ([\d.]+)\s*\]", data)
    return len(re.findall(rb"/Type\s*/Page[^s]", data)), [(float(w), float(h)) for w, h in boxes]


def check_page(browser: str, page: Path, name: str, out: Path, height: int) -> list[str]:
    """Screenshot and print one report; returns the problems found (empty: the page passed)."""
    problems = []
    probe = page.with_name(f".report-check-{page.name}")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    try:
        png = out / f"{name}.png"
        messages = browse(browser, probe, f"--window-size=1280,{height}", f"--screenshot={png}")
        pdf = out / f"{name}.pdf"
        browse(browser, page, "--no-pdf-header-footer", f"--print-to-pdf={pdf}")
    finally:
        probe.unlink()
    summary = [m for m in messages if m.startswith("report-check: ")]
    problems += [f"browser console: {m}" for m in messages if not m.startswith("report-check: ")]
    if not summary:
        problems.append("the page never finished loading (no load event)")
    white = blank_fraction(png)
    if white > 0.985:
        problems.append(f"the screenshot is blank ({100 * white:.1f}% white)")
    pages, sizes = pdf_pages(pdf)
    a4 = pages > 0 and all(abs(w - A4_POINTS[0]) <= 2 and abs(h - A4_POINTS[1]) <= 2 for w, h in sizes)
    if not a4:
        problems.append(f"the PDF is not A4 pages: {pages} pages, sizes {sorted(set(sizes))}")
    print(f"{name}: {page.stat().st_size / 1024:.0f} KiB; {summary[0][len('report-check: '):] if summary else '?'}; "
          f"screenshot {png} ({100 * (1 - white):.1f}% non-white); PDF {pdf}: {pages} {'A4 ' if a4 else ''}pages")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("report-check"), help="folder for the PNGs and PDFs")
    args = parser.parse_args()
    browser = find_browser()
    from ltbench.report import write_runs_report
    from ltbench.runner import RunOptions, run

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ltbench-report-check-") as work:
        runs = Path(work) / "runs"
        result = run(RunOptions(model="tests.mean_detector:MeanDetector", split="synth/exp100", out=runs,
                                device="cpu", progress=False, command="ltbench run --model tests.mean_detector:MeanDetector"),
                     report=lambda line: print(line, file=sys.stderr))
        run_page = result.run_dir / "report.html"
        folder_page, _ = write_runs_report(runs, with_paper=True)
        print(f"report-check: {Path(browser).name}, "
              f"{subprocess.run([browser, '--version'], capture_output=True, text=True, check=False).stdout.strip()}")
        problems = check_page(browser, run_page, "run-report", args.out, 7000)
        problems += check_page(browser, folder_page, "runs-report", args.out, 2400)
    for problem in problems:
        print(f"report-check FAILED: {problem}")
    if problems:
        sys.exit(1)
    print("report-check: both pages rendered, no browser errors")


if __name__ == "__main__":
    main()
