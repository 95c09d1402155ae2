"""`qtune runs` and `qtune report`: look back at runs from what they wrote to disk.

``qtune runs [DIR]`` lists the runs in an output folder as a table (or JSON); each run's status
comes from its files: ``adapter/`` (finished), ``running.json`` with a live process (running), a
complete checkpoint (resumable), the error in ``summary.json`` (stopped by Ctrl-C, or failed; a
killed process leaves no summary and counts as failed).

``qtune report RUN_DIR...`` writes one self-contained HTML page: a Plotly chart per metric with
each run's series (plotly.js is inlined, so the page opens with no network), the config
differences, the memory report, the evaluation and the exports with their verify figures.
``--terminal`` draws the loss curves in the terminal with plotext instead.

A built-in plugin: it adds its commands through ``register_commands`` and imports only
``qtune.api``; click, rich, plotly, jinja2 and plotext load inside the commands.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from qtune.api import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    RUNNING_FILE,
    QtuneError,
    atomic_file,
    hookimpl,
    last_complete_checkpoint,
    read_json_dict,
    read_metrics,
)

#: metrics.jsonl key -> chart title, in the report's order
CHARTS = {
    "loss": "training loss",
    "eval_loss": "validation loss",
    "learning_rate": "learning rate",
    "tokens_per_second": "tokens/s (training)",
    "memory_gib": "memory (GiB: GPU reserved, or resident on CPU)",
}
#: `qtune runs --sort` keys -> the row field they sort by
SORT_KEYS = {
    "started": "started", "name": "name", "steps": "steps", "loss": "final_loss", "eval_loss": "eval_loss",
    "score": "eval_score", "tokens_per_second": "tokens_per_second", "memory": "peak_memory_gib", "status": "status",
}
#: (row field, column title) of the `qtune runs` table
COLUMNS = [
    ("name", "name"), ("model", "model"), ("template", "template"), ("dataset", "dataset"), ("steps", "steps"),
    ("final_loss", "loss"), ("eval_loss", "val loss"), ("eval_score", "score"),
    ("tokens_per_second", "tok/s"), ("peak_memory_gib", "peak GiB"), ("exports", "exports"), ("status", "status"),
]


# --------------------------------------------------------------------------- reading a run


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def run_status(run_dir: Path, summary: dict[str, Any]) -> str:
    """finished, running, resumable, stopped or failed, from the files the run left."""
    if (run_dir / ADAPTER_DIR / "adapter_config.json").is_file():
        return "finished"
    running = read_json_dict(run_dir / RUNNING_FILE)
    if running.get("host") == socket.gethostname() and isinstance(running.get("pid"), int) and process_alive(running["pid"]):
        return "running"
    if running and running.get("host") != socket.gethostname():
        return f"running on {running.get('host')}?"
    if last_complete_checkpoint(run_dir / CHECKPOINTS_DIR) is not None:
        return "resumable"
    if summary.get("error") == "KeyboardInterrupt":
        return "stopped"
    return "failed"


def _short(value: Any) -> str:
    """A model or dataset as a table cell: a local path by its last part, a hub id as is."""
    if not value:
        return "-"
    text = str(value)
    return Path(text).name if text.startswith(("/", ".", "~")) else text


class RunInfo:
    """One run directory as ``runs`` and ``report`` read it: config, summary, metrics, status."""

    def __init__(self, run_dir: Path) -> None:
        import yaml

        self.run_dir = Path(run_dir)
        config_file = self.run_dir / "config.yaml"
        if not config_file.is_file():
            raise QtuneError(f"{str(run_dir)!r} is not a qtune run directory (no config.yaml); pass a folder `qtune run` made")
        try:
            config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            config = {}
        self.config: dict[str, Any] = config if isinstance(config, dict) else {}
        self.summary = read_json_dict(self.run_dir / "summary.json")
        self.metrics = read_metrics(self.run_dir)
        self.status = run_status(self.run_dir, self.summary)
        self.label = self.run_dir.name
        self.started = config_file.stat().st_mtime

    def section(self, name: str) -> dict[str, Any]:
        value = self.config.get(name)
        return value if isinstance(value, dict) else {}

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric, as logged."""
        points = [(r["step"], float(r[key])) for r in self.metrics if key in r and isinstance(r.get("step"), int)]
        return [s for s, _ in points], [v for _, v in points]

    def row(self) -> dict[str, Any]:
        """The figures of `qtune runs` (None where the run has none)."""
        summary, training = self.summary, self.section("training")
        steps, losses = self.series("loss")
        _, evals = self.series("eval_loss")
        _, speeds = self.series("tokens_per_second")
        _, memory = self.series("memory_gib")
        report = summary.get("memory") if isinstance(summary.get("memory"), dict) else {}
        peak = report.get("peak_reserved_gib", report.get("peak_rss_gib"))
        if peak is None and memory:
            peak = max(memory)
        after = summary.get("eval_after") if isinstance(summary.get("eval_after"), dict) else {}
        exports = summary.get("exports") if isinstance(summary.get("exports"), dict) else {}
        max_steps = training.get("max_steps")
        return {
            "name": self.label,
            "path": str(self.run_dir),
            "model": _short(self.section("model").get("name")),
            "template": self.config.get("template") or "-",
            "dataset": _short(self.section("dataset").get("path") or self.section("dataset").get("loader")),
            "steps": summary.get("steps", steps[-1] if steps else 0),
            "max_steps": max_steps if isinstance(max_steps, int) and max_steps > 0 else None,
            "final_loss": losses[-1] if losses else None,
            "eval_loss": evals[-1] if evals else None,
            "eval_score": after.get("accuracy"),
            # the mean of the logged steps' training speed (evaluation time left out)
            "tokens_per_second": sum(speeds) / len(speeds) if speeds else None,
            "peak_memory_gib": peak,
            "exports": {name: _verify_passed(record) for name, record in exports.items()},
            "status": self.status,
            "started": self.started,
            "error": summary.get("error"),
        }


def _verify_passed(record: Any) -> bool | None:
    verify = record.get("verify") if isinstance(record, dict) else None
    return verify.get("passed") if isinstance(verify, dict) else None


def find_runs(folder: Path) -> list[RunInfo]:
    """The runs in ``folder`` (its sub-folders holding a config.yaml), or ``folder`` itself if it is one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QtuneError(f"{str(folder)!r} is not a folder; give the output folder of your runs (training.output_dir, `runs` by default)")
    if (folder / "config.yaml").is_file():
        return [RunInfo(folder)]
    return [RunInfo(p) for p in sorted(folder.iterdir()) if p.is_dir() and (p / "config.yaml").is_file()]


def sort_rows(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """By ``key`` (a SORT_KEYS name); numbers ascending except scores and speeds (best first); runs
    without the figure last."""
    field = SORT_KEYS[key]
    descending = field in ("eval_score", "tokens_per_second", "steps")
    present = [r for r in rows if r.get(field) is not None]
    missing = [r for r in rows if r.get(field) is None]
    return sorted(present, key=lambda r: r[field], reverse=descending) + missing


# --------------------------------------------------------------------------- qtune runs


def _cell(field: str, row: dict[str, Any]) -> str:
    value = row.get(field)
    if field == "steps":
        return f"{value}/{row['max_steps']}" if row.get("max_steps") else str(value)
    if field == "exports":
        marks = {True: "✓", False: "✗", None: ""}
        return " ".join(f"{name}{marks[ok]}" for name, ok in value.items()) or "-"
    if value is None:
        return "-"
    if field in ("final_loss", "eval_loss"):
        return f"{value:.4f}"
    if field == "eval_score":
        return f"{value:.1%}"
    if field == "tokens_per_second":
        return f"{value:,.0f}"
    if field == "peak_memory_gib":
        return f"{value:.2f}"
    return str(value)


STATUS_STYLE = {"finished": "green", "running": "cyan", "resumable": "yellow", "stopped": "yellow", "failed": "red"}


#: columns left out, in this order, when the table is wider than the terminal
NARROW_DROPS = ("template", "dataset", "exports", "peak_memory_gib", "model", "eval_score", "tokens_per_second")


def runs_table(rows: list[dict[str, Any]], title: str, width: int = 200):
    """The `qtune runs` table, at most ``width`` columns wide: cells are never cut; in a narrow
    terminal the less telling columns are left out (the caption names them; --json has all)."""
    from rich import box
    from rich.table import Table

    cells = [[_cell(field, row) for field, _ in COLUMNS] for row in rows]
    widths = {field: max([len(header)] + [len(line[i]) for line in cells]) for i, (field, header) in enumerate(COLUMNS)}
    shown = [field for field, _ in COLUMNS]
    for field in NARROW_DROPS:
        if sum(widths[f] + 3 for f in shown) <= width:
            break
        shown.remove(field)
    hidden = [header for field, header in COLUMNS if field not in shown]
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left",
                  caption=f"not shown (too narrow): {', '.join(hidden)}" if hidden else None, caption_justify="left")
    numeric = ("steps", "final_loss", "eval_loss", "eval_score", "tokens_per_second", "peak_memory_gib")
    for field, header in COLUMNS:
        if field in shown:
            table.add_column(header, justify="right" if field in numeric else "left", no_wrap=True)
    for row, line in zip(rows, cells, strict=True):
        values = [value for (field, _), value in zip(COLUMNS, line, strict=True) if field in shown]
        style = STATUS_STYLE.get(row["status"], "")
        values[-1] = f"[{style}]{values[-1]}[/]" if style else values[-1]
        table.add_row(*values)
    return table


# --------------------------------------------------------------------------- qtune report


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"training.max_steps": 60, ...}``; lists stay values."""
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def config_rows(runs: list[RunInfo]) -> tuple[list[tuple[str, list[str]]], bool]:
    """(key, the value in each run) for the keys whose values differ; with one run, every key.
    The flag says whether only differences are listed."""
    flats = [flatten(run.config) for run in runs]
    keys = list(dict.fromkeys(key for flat in flats for key in flat))
    rows = []
    for key in keys:
        values = [json.dumps(flat[key]) if key in flat else "(absent)" for flat in flats]
        if len(runs) == 1 or len(set(values)) > 1:
            rows.append((key, values))
    return rows, len(runs) > 1


def chart_html(runs: list[RunInfo], key: str, title: str) -> str | None:
    """One Plotly chart of metric ``key`` with a series per run, as a <div> and its script; None when
    no run logged it."""
    import plotly.graph_objects as go

    figure = go.Figure()
    for run in runs:
        steps, values = run.series(key)
        if steps:
            figure.add_trace(go.Scatter(x=steps, y=values, name=run.label, mode="lines+markers" if key == "eval_loss" else "lines"))
    if not figure.data:
        return None
    figure.update_layout(
        title=title, xaxis_title="step", template="plotly_white", height=340, margin={"l": 60, "r": 20, "t": 50, "b": 45},
        legend={"orientation": "h", "y": -0.25}, showlegend=True,
    )
    return figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"chart-{key}",
                          config={"displaylogo": False, "responsive": True})


def evaluation_rows(run: RunInfo) -> list[tuple[str, str]]:
    summary = run.summary
    rows = []
    if "eval_loss" in summary:
        rows.append(("validation loss (last)", f"{summary['eval_loss']:.4f} at step {summary.get('eval_loss_step')}"))
    if "best_eval_loss" in summary:
        rows.append(("validation loss (best)", f"{summary['best_eval_loss']:.4f} at step {summary.get('best_eval_loss_step')}"))
    if summary.get("early_stopped"):
        rows.append(("early stopping", f"stopped at step {summary.get('steps')}"))
    for key, label in (("eval_before", "exact match before training"), ("eval_after", "exact match after training")):
        result = summary.get(key)
        if isinstance(result, dict) and "accuracy" in result:
            rows.append((label, f"{result['accuracy']:.1%} ({result.get('correct')}/{result.get('total')}, {result.get('seconds', '?')} s)"))
    return rows


def export_rows(run: RunInfo) -> list[dict[str, Any]]:
    exports = run.summary.get("exports")
    rows = []
    for name, record in (exports.items() if isinstance(exports, dict) else []):
        record = record if isinstance(record, dict) else {}
        verify = record.get("verify") if isinstance(record.get("verify"), dict) else None
        size = record.get("bytes")
        rows.append({
            "name": name,
            "format": record.get("format", "?"),
            "size": f"{size / 2**20:,.1f} MiB" if isinstance(size, (int, float)) else "-",
            "seconds": record.get("seconds", "-"),
            "verified": "-" if verify is None else ("passed" if verify.get("passed") else "FAILED: " + "; ".join(verify.get("failures") or [])),
            "top1": verify.get("top1_agreement", "-") if verify else "-",
            "top5": verify.get("top5_agreement", "-") if verify else "-",
            "max_logit_diff": verify.get("max_abs_logit_diff", "-") if verify else "-",
            "reference": f"{verify.get('runtime', '')} vs {verify.get('reference', '')}" if verify else "-",
            "path": record.get("path", ""),
        })
    return rows


REPORT_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>qtune report: {{ title }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.meta { color: #666; } table { border-collapse: collapse; margin: 8px 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 12px; }
.chart { border: 1px solid #eee; } .finished { color: #080; } .failed { color: #b00; }
.resumable, .stopped { color: #a60; } code { font-size: 0.95em; }
</style>
<script type="text/javascript">{{ plotly_js | safe }}</script>
</head>
<body>
<h1>qtune report: {{ title }}</h1>
<p class="meta">written {{ written }} by qtune {{ version }} from {{ runs | length }} run{{ "s" if runs | length > 1 }}</p>

<h2>Runs</h2>
<table id="runs">
<tr><th>run</th><th>status</th><th>model</th><th>template</th><th>dataset</th><th>steps</th><th>final loss</th>
<th>validation loss</th><th>eval score</th><th>tokens/s</th><th>peak GiB</th><th>folder</th></tr>
{% for row in rows %}<tr><td>{{ row.name }}</td><td class="{{ row.status }}">{{ row.status }}</td><td>{{ row.model }}</td>
<td>{{ row.template }}</td><td>{{ row.dataset }}</td><td class="num">{{ cells[loop.index0].steps }}</td>
<td class="num">{{ cells[loop.index0].final_loss }}</td><td class="num">{{ cells[loop.index0].eval_loss }}</td>
<td class="num">{{ cells[loop.index0].eval_score }}</td><td class="num">{{ cells[loop.index0].tokens_per_second }}</td>
<td class="num">{{ cells[loop.index0].peak_memory_gib }}</td><td><code>{{ row.path }}</code></td></tr>
{% if row.error %}<tr><td></td><td colspan="11" class="failed">{{ row.error }}</td></tr>{% endif %}
{% endfor %}
</table>

<h2>Curves</h2>
<div class="charts">
{% for chart in charts %}<div class="chart">{{ chart | safe }}</div>
{% endfor %}</div>
<script type="text/javascript">
// plotly sizes each chart as it is drawn; fit them all to their grid cells once the page is laid out
window.addEventListener("load", () => document.querySelectorAll(".js-plotly-plot").forEach(d => Plotly.Plots.resize(d)));
</script>
{% if missing_charts %}<p class="meta">not logged by any of these runs: {{ missing_charts | join(", ") }}</p>{% endif %}

<h2>{{ "Config differences" if only_differences else "Config" }}</h2>
{% if config_rows %}<table id="config">
<tr><th>key</th>{% for run in runs %}<th>{{ run.label }}</th>{% endfor %}</tr>
{% for key, values in config_rows %}<tr><td><code>{{ key }}</code></td>{% for value in values %}<td><code>{{ value }}</code></td>{% endfor %}</tr>
{% endfor %}</table>{% else %}<p>The runs have the same resolved config.</p>{% endif %}

<h2>Memory</h2>
{% if memory_keys %}<table id="memory">
<tr><th></th>{% for run in runs %}<th>{{ run.label }}</th>{% endfor %}</tr>
{% for key in memory_keys %}<tr><td>{{ key }}</td>{% for run in runs %}<td class="num">{{ run.summary.get("memory", {}).get(key, "-") }}</td>{% endfor %}</tr>
{% endfor %}</table>{% else %}<p>No memory report (the memory_monitor callback was off, or no run finished).</p>{% endif %}

<h2>Evaluation</h2>
{% for run in runs %}<h3>{{ run.label }}</h3>
{% set rows_ = evaluations[loop.index0] %}{% if rows_ %}<table class="evaluation">
{% for label, value in rows_ %}<tr><th>{{ label }}</th><td>{{ value }}</td></tr>{% endfor %}</table>
{% else %}<p>No evaluation recorded (set dataset.eval_size for a validation loss, evaluation.exact_match for exact match).</p>{% endif %}
{% set samples = run.summary.get("eval_after", {}).get("samples") if run.summary.get("eval_after") is mapping else None %}
{% if samples %}<details><summary>exact-match samples after training</summary><table>
<tr><th>instruction</th><th>input</th><th>expected</th><th>answer</th></tr>
{% for s in samples %}<tr><td>{{ s.instruction }}</td><td>{{ s.input }}</td><td>{{ s.expected }}</td><td>{{ s.answer }}</td></tr>{% endfor %}
</table></details>{% endif %}
{% endfor %}

<h2>Exports</h2>
{% for run in runs %}{% set rows_ = exports[loop.index0] %}{% if rows_ %}<h3>{{ run.label }}</h3><table class="exports">
<tr><th>export</th><th>format</th><th>size</th><th>seconds</th><th>verify</th><th>top-1</th><th>top-5</th><th>max |&Delta;logit|</th><th>compared</th><th>path</th></tr>
{% for e in rows_ %}<tr><td>{{ e.name }}</td><td>{{ e.format }}</td><td class="num">{{ e.size }}</td><td class="num">{{ e.seconds }}</td>
<td>{{ e.verified }}</td><td class="num">{{ e.top1 }}</td><td class="num">{{ e.top5 }}</td><td class="num">{{ e.max_logit_diff }}</td>
<td>{{ e.reference }}</td><td><code>{{ e.path }}</code></td></tr>{% endfor %}
</table>{% endif %}{% endfor %}
{% if not exports | select | list %}<p>No exports.</p>{% endif %}
</body>
</html>
"""


def render_report(runs: list[RunInfo]) -> tuple[str, int]:
    """The report page and its number of charts."""
    from importlib.metadata import version

    import jinja2
    from plotly.offline import get_plotlyjs

    charts, missing = [], []
    for key, title in CHARTS.items():
        html = chart_html(runs, key, title)
        if html is None:
            missing.append(title)
        else:
            charts.append(html)
    rows = [run.row() for run in runs]
    config, only_differences = config_rows(runs)
    memory_keys = list(dict.fromkeys(k for run in runs if isinstance(run.summary.get("memory"), dict) for k in run.summary["memory"]))
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    page = environment.from_string(REPORT_TEMPLATE).render(
        title=", ".join(run.label for run in runs),
        written=time.strftime("%Y-%m-%d %H:%M:%S"),
        version=version("qtune"),
        runs=runs,
        rows=rows,
        cells=[{field: _cell(field, row) for field, _ in COLUMNS} for row in rows],
        charts=charts,
        missing_charts=missing,
        config_rows=config,
        only_differences=only_differences,
        memory_keys=memory_keys,
        evaluations=[evaluation_rows(run) for run in runs],
        exports=[export_rows(run) for run in runs],
        # "</script" inside the inlined library would end its <script> element early
        plotly_js=get_plotlyjs().replace("</script", "<\\/script"),
    )
    return page, len(charts)


def terminal_plot(runs: list[RunInfo], width: int, height: int) -> str:
    """The training and validation loss of each run, drawn with plotext."""
    import plotext

    plotext.clear_figure()
    plotext.plotsize(width, height)
    plotext.theme("clear")
    for run in runs:
        steps, losses = run.series("loss")
        if steps:
            plotext.plot(steps, losses, label=f"{run.label} loss", marker="braille")
        steps, evals = run.series("eval_loss")
        if steps:
            plotext.plot(steps, evals, label=f"{run.label} validation", marker="dot")
    plotext.title("loss")
    plotext.xlabel("step")
    return plotext.build()


# --------------------------------------------------------------------------- the commands


def _import_or_explain(module: str, requirement: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise QtuneError(f"this needs the {module} package; install it with `pip install {requirement}` (or `pip install 'qtune[track]'`)")


@hookimpl
def register_commands(cli):
    import click

    @cli.command()
    @click.argument("folder", required=False, default="runs", type=click.Path(path_type=Path))
    @click.option("--sort", "sort_key", type=click.Choice(list(SORT_KEYS)), default="started", show_default=True,
                  help="Order of the rows; scores, speed and steps best first, losses lowest first.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON (one object per run) instead of a table.")
    def runs(folder: Path, sort_key: str, as_json: bool):
        """List the runs in FOLDER (default: runs): model, data, steps, losses, scores, speed, memory, exports, status.

        \b
        status: finished (adapter saved), running, resumable (a complete checkpoint:
        `qtune run --resume DIR`), stopped (Ctrl-C), failed (an error, or killed).
        """
        rows = sort_rows([run.row() for run in find_runs(folder)], sort_key)
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        from rich.console import Console

        out = Console(highlight=False)
        if not rows:
            out.print(f"no runs in {folder} (folders with a config.yaml)")
            return
        out.print(runs_table(rows, f"runs in {folder}", out.width))

    @cli.command()
    @click.argument("run_dirs", metavar="RUN_DIR...", nargs=-1, required=True, type=click.Path(path_type=Path))
    @click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
                  help="The HTML file to write (default: RUN_DIR/report.html for one run, qtune-report.html for several).")
    @click.option("--terminal", is_flag=True, help="Draw the loss curves in the terminal (plotext) instead of writing HTML.")
    def report(run_dirs: tuple[Path, ...], output: Path | None, terminal: bool):
        """Curves of one or more runs (loss, validation loss, learning rate, tokens/s, memory) with
        their config differences, memory report, evaluation and exports, as one self-contained HTML page."""
        runs = [RunInfo(path) for path in run_dirs]
        labels = [run.label for run in runs]
        for run in runs:  # two runs of the same name from different folders
            if labels.count(run.label) > 1:
                run.label = f"{run.run_dir.parent.name}/{run.label}"
        if terminal:
            _import_or_explain("plotext", "plotext")
            import shutil

            size = shutil.get_terminal_size((100, 30))
            click.echo(terminal_plot(runs, min(size.columns, 160), max(min(size.lines - 4, 30), 12)))
            return
        _import_or_explain("plotly", "plotly")
        target = output or (runs[0].run_dir / "report.html" if len(runs) == 1 else Path("qtune-report.html"))
        page, count = render_report(runs)
        with atomic_file(target) as handle:
            handle.write(page)
        click.echo(f"wrote {target} ({count} charts, {len(runs)} run{'s' if len(runs) > 1 else ''})")
