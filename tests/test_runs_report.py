"""`qtune runs` and `qtune report` on real runs: finished, killed, interrupted after a checkpoint; the
HTML report opened in a real headless chromium; the terminal plot."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import ALPACA_ROWS, OFFLINE_ENV, QTUNE, read_metrics, run_qtune, tiny_run_config, write_jsonl
from qtune_cli.main import cli, main

REPO = Path(__file__).resolve().parent.parent


def invoke(*args):
    """The CLI as `qtune` builds it (plugin commands added), in this process."""
    from qtune_cli.main import _add_plugin_commands

    _add_plugin_commands()
    return CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_qwen_dir):
    """Two finished runs in one output folder that differ in learning rate, with validation loss."""
    tmp = tmp_path_factory.mktemp("two-runs")
    data = write_jsonl(tmp / "data.jsonl", ALPACA_ROWS * 4 + ALPACA_ROWS)
    for name, rate in (("slow", 1e-3), ("fast", 5e-3)):
        config = tiny_run_config(tmp, tiny_qwen_dir, data, name=name, dataset={"path": str(data), "eval_size": 4},
                                 training={"max_steps": 4, "eval_steps": 2, "learning_rate": rate})
        result = invoke("run", config, "--no-progress")
        assert result.exit_code == 0, result.output
    return tmp / "runs"


def test_runs_lists_finished_runs_with_their_figures_sorted(two_runs):
    result = invoke("runs", two_runs, "--json", "--sort", "name")
    rows = json.loads(result.output)
    assert [r["name"] for r in rows] == ["fast", "slow"]
    for row in rows:
        records = read_metrics(two_runs / row["name"])
        losses = [m["loss"] for m in records if "loss" in m]
        speeds = [m["tokens_per_second"] for m in records if "tokens_per_second" in m]
        summary = json.loads((two_runs / row["name"] / "summary.json").read_text())
        assert row["status"] == "finished" and row["steps"] == 4 and row["max_steps"] == 4
        assert row["final_loss"] == losses[-1] and row["eval_loss"] == [m["eval_loss"] for m in records if "eval_loss" in m][-1]
        assert row["tokens_per_second"] == pytest.approx(sum(speeds) / len(speeds))
        assert row["peak_memory_gib"] == summary["memory"]["peak_rss_gib"]
        assert row["template"] == "alpaca" and row["dataset"] == "data.jsonl"
    by_loss = json.loads(invoke("runs", two_runs, "--json", "--sort", "eval_loss").output)
    assert [r["eval_loss"] for r in by_loss] == sorted(r["eval_loss"] for r in rows)
    table = invoke("runs", two_runs).output
    assert "fast" in table and "slow" in table and "finished" in table and "val loss" in table


def _wait_for(condition, proc, seconds=1200):  # generous: a loaded 2-core machine
    deadline = time.monotonic() + seconds
    while proc.poll() is None and time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def _logged_steps(run_dir: Path) -> list[int]:
    steps = []
    if (run_dir / "metrics.jsonl").is_file():
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            try:
                steps.append(json.loads(line).get("step"))
            except ValueError:
                pass
    return steps


@pytest.mark.slow
def test_runs_tells_running_killed_and_resumable_runs_apart(tmp_path, tiny_qwen_dir):
    from qtune.run import checkpoint_is_complete

    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS * 4)
    root = tmp_path / "runs"
    procs = {}
    for name, save_steps in (("killed", 0), ("interrupted", 2)):
        folder = tmp_path / name
        folder.mkdir()
        config = tiny_run_config(folder, tiny_qwen_dir, data, name=name, training={"max_steps": 400, "save_steps": save_steps,
                                                                                    "output_dir": str(root)})
        procs[name] = subprocess.Popen([QTUNE, "run", str(config), "--no-progress"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, env={**os.environ, **OFFLINE_ENV})
    try:
        # a run in progress, then killed with SIGKILL before any checkpoint: it leaves no summary
        assert _wait_for(lambda: 1 in _logged_steps(root / "killed"), procs["killed"])
        statuses = {r["name"]: r["status"] for r in json.loads(invoke("runs", root, "--json").output)}
        assert statuses["killed"] == "running"
        procs["killed"].send_signal(signal.SIGKILL)
        procs["killed"].wait(timeout=60)
        # Ctrl-C once checkpoint-2 is complete: resumable
        assert _wait_for(lambda: checkpoint_is_complete(root / "interrupted" / "checkpoints" / "checkpoint-2"), procs["interrupted"])
        procs["interrupted"].send_signal(signal.SIGINT)
        procs["interrupted"].wait(timeout=120)  # SIGINT must be deliverable (conftest: not ignored)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    assert not (root / "killed" / "summary.json").exists() and (root / "killed" / "running.json").exists()
    assert json.loads((root / "interrupted" / "summary.json").read_text())["error"] == "KeyboardInterrupt"
    assert not (root / "interrupted" / "running.json").exists()
    rows = {r["name"]: r for r in json.loads(invoke("runs", root, "--json").output)}
    assert rows["killed"]["status"] == "failed" and rows["interrupted"]["status"] == "resumable"
    assert rows["interrupted"]["steps"] >= 2 and rows["interrupted"]["max_steps"] == 400
    # Without its checkpoint, an interrupted run is only stopped.
    shutil.rmtree(root / "interrupted" / "checkpoints")
    assert json.loads(invoke("runs", root / "interrupted", "--json").output)[0]["status"] == "stopped"


def test_runs_and_report_refuse_what_is_not_a_run(tmp_path):
    from helpers import one_line_error

    assert "is not a folder" in one_line_error(run_qtune("runs", tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    assert "no runs in" in run_qtune("runs", tmp_path / "empty").stdout
    line = one_line_error(run_qtune("report", tmp_path / "empty"))
    assert "is not a qtune run directory (no config.yaml)" in line
    assert not list(tmp_path.rglob("*.html"))


# --------------------------------------------------------------------------- the HTML report in a browser


def chromium_path() -> str | None:
    """Debian's chromium, installed the way .ci/run installs it when it is missing."""
    found = shutil.which("chromium")
    if found is None:
        subprocess.run(["bash", str(REPO / ".ci" / "install-chromium")], capture_output=True, timeout=900)
        found = shutil.which("chromium")
    return found


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def open_report(html: Path, screenshot: Path | None = None) -> dict:
    """Load ``html`` in headless chromium (Playwright): console errors, page errors, requests that
    left the file, and each chart's id and series names; a full-page PNG to ``screenshot``."""
    from playwright.sync_api import sync_playwright

    browser_path = chromium_path()
    if browser_path is None:
        pytest.skip("chromium is not installed and apt-get could not install it")
    found = {"console_errors": [], "page_errors": [], "requests": []}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: found["console_errors"].append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: found["page_errors"].append(str(e)))
            page.on("request", lambda r: found["requests"].append(r.url) if not r.url.startswith(("file:", "data:")) else None)
            page.goto(html.resolve().as_uri(), wait_until="load")
            # every chart drawn (plotly.js renders them one after the other), then its layout settled
            page.wait_for_function("Array.from(document.querySelectorAll('.plotly-graph-div'))"
                                   ".every(d => d.classList.contains('js-plotly-plot') && d.querySelector('.main-svg'))")
            page.wait_for_timeout(1000)
            found["charts"] = page.evaluate(
                "Array.from(document.querySelectorAll('.js-plotly-plot')).map(d => "
                "({id: d.id, title: d.layout.title.text, series: d.data.map(t => t.name), points: d.data.map(t => t.x.length),"
                " drawn: d.querySelectorAll('.scatterlayer .trace').length}))"
            )
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return found


def test_report_opens_in_a_browser_with_one_chart_per_metric_and_each_run(two_runs, tmp_path):
    out = tmp_path / "report.html"
    result = invoke("report", two_runs / "slow", two_runs / "fast", "-o", out)
    assert result.output == f"wrote {out} (5 charts, 2 runs)\n"
    page = out.read_text()
    assert "<script src=" not in page  # plotly.js is inlined: nothing to fetch
    shot = tmp_path / "report.png"
    found = open_report(out, shot)
    assert found["console_errors"] == [] and found["page_errors"] == [] and found["requests"] == []
    charts = {c["id"]: c for c in found["charts"]}
    assert sorted(charts) == sorted(f"chart-{k}" for k in ("loss", "eval_loss", "learning_rate", "tokens_per_second", "memory_gib"))
    for chart in charts.values():
        assert chart["series"] == ["slow", "fast"] and chart["drawn"] == 2, chart
    assert charts["chart-loss"]["points"] == [4, 4] and charts["chart-eval_loss"]["points"] == [2, 2]
    assert shot.stat().st_size > 20_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the config difference between the two runs, and the sections
    assert "training.learning_rate" in page and "<h2>Config differences</h2>" in page
    assert "peak_rss_gib" in page and "validation loss (last)" in page


def test_report_of_one_run_defaults_into_its_folder_and_lists_its_whole_config(two_runs):
    result = invoke("report", two_runs / "slow")
    target = two_runs / "slow" / "report.html"
    assert result.output == f"wrote {target} (5 charts, 1 run)\n"
    page = target.read_text()
    assert "<h2>Config</h2>" in page and "training.max_steps" in page


def test_terminal_report_draws_the_loss_curves(two_runs):
    result = invoke("report", two_runs / "slow", two_runs / "fast", "--terminal")
    text = result.output
    assert "slow loss" in text and "fast validation" in text and "step" in text
    assert any(ch in text for ch in "⠁⠂⠄⡀⢀⠈⠐⠠"), "no braille points drawn"
    losses = [m["loss"] for m in read_metrics(two_runs / "fast") if "loss" in m]
    assert len([line for line in text.splitlines() if line.strip()]) >= 10 and losses


def test_help_lists_runs_and_report_without_importing_plotting_libraries():
    code = ("import sys; from qtune_cli.main import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('plotly', 'plotext', 'jinja2', 'torch', 'tensorboard') if m in sys.modules))")
    result = subprocess.run([str(Path(QTUNE).with_name("python")), "-c", code], capture_output=True, text=True,
                            env={**os.environ, **OFFLINE_ENV}, timeout=60)
    assert "runs " in result.stdout and "report " in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert main  # the entry point used above


@pytest.mark.parametrize("module", ["reports", "progress", "memory_monitor"])
def test_these_builtin_plugins_import_only_the_plugin_api(module):
    import ast

    tree = ast.parse((REPO / "plugins" / f"{module}.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert {name for name in imported if name.split(".")[0] == "qtune"} <= {"qtune.api"}
