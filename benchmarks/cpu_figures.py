r"""The CPU figures that README.md and docs/export.md quote, measured anew on this machine:

  demo        `qtune run` on the demo preset: exact match on the held-out tasks before and after
              training, validation loss, time and peak resident memory
  chat-demo   the same for the conversational demo (last answer of held-out conversations)
  exports     every export format of the demo run, `qtune export RUN --format F --verify` each

Usage, from the project root (about 20 minutes on 2 cores; the demo model converts once):
    python benchmarks/cpu_figures.py [--only demo,chat-demo,exports] [--write]

It prints a table, writes benchmarks/results/cpu_figures.json and, with --write, rewrites the blocks
between `<!-- figures:NAME -->` and `<!-- /figures:NAME -->` in README.md and docs/export.md from
that JSON. tests/test_docs.py checks that every such block is what this script renders from the
committed JSON, so a figure in the docs is always one this script measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "cpu_figures.json"
WORK = Path(os.environ.get("BENCH_WORK", "/tmp/qtune-cpu-figures"))
QTUNE = [sys.executable, "-c", "import sys; from qtune_cli.main import main; main(sys.argv[1:])"]
EXPORTS = [("lora", None), ("merged-16bit", "bf16"), ("merged-16bit", "fp32"), ("merged-4bit", None),
           ("gguf", "f16"), ("gguf", "q8_0"), ("gguf", "q5_k_m"), ("gguf", "q4_k_m"), ("gguf", "q4_0")]
#: the docs files whose marked blocks come from the JSON
DOCS = [ROOT / "README.md", ROOT / "docs" / "export.md"]


def timed(argv: list[str], may_fail: bool = False) -> dict:
    """Run a qtune command; its wall time, peak resident memory (its own process) and output. A
    failure ends the script, unless ``may_fail`` (an export whose verification fails is a figure)."""
    started = time.perf_counter()
    proc = subprocess.Popen(QTUNE + argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=WORK,
                            env={**os.environ, "COLUMNS": "100", "PYTHONUNBUFFERED": "1"})
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = {"argv": argv, "rc": proc.returncode, "wall_s": round(time.perf_counter() - started, 1),
              "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2), "output": output.splitlines()[-40:]}
    if proc.returncode != 0 and not may_fail:
        sys.exit(f"`qtune {' '.join(map(str, argv))}` failed ({proc.returncode}):\n" + "\n".join(result["output"][-15:]))
    return result


def demo(preset: str) -> dict:
    """A preset's run: the command's figures and the run's summary.json."""
    config = WORK / f"{preset}.yaml"
    timed(["init", str(config), "--preset", preset, "--force"])
    name = f"figures-{preset}"
    result = timed(["run", str(config), "--no-progress", "--set", f"training.output_dir={WORK / 'runs'}", "--set", f"name={name}"])
    run_dir = WORK / "runs" / name
    summary = json.loads((run_dir / "summary.json").read_text())
    keep = ("steps", "train_loss", "train_runtime_s", "eval_before", "eval_after", "best_eval_loss", "best_eval_loss_step")
    return result | {"machine": machine(), "run_dir": str(run_dir), "summary": {k: summary.get(k) for k in keep}}


def export(run_dir: str, fmt: str, quant: str | None) -> dict:
    argv = ["export", run_dir, "--format", fmt, "--verify", "--force"] + (["--quant", quant] if quant else [])
    result = timed(argv, may_fail=True)
    records = json.loads((Path(run_dir) / "exports" / "exports.json").read_text())
    record = next(r for r in records.values() if r["format"] == fmt and (quant is None or r.get("quant") == quant))
    verify = record["verify"]
    return {"format": fmt, "quant": record.get("quant"), "wall_s": result["wall_s"], "peak_rss_gb": result["peak_rss_gb"],
            "export_s": record.get("seconds"), "verify_s": verify["seconds"], "bytes": record["bytes"],
            "top1": verify["top1_agreement"], "top5": verify["top5_agreement"], "max_abs_logit_diff": verify["max_abs_logit_diff"],
            "min_top1": verify["min_top1"], "min_top5": verify["min_top5"], "passed": verify["passed"], "tokens": verify["tokens"],
            "output": result["output"], "commit": machine()["commit"]}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return {"date": time.strftime("%Y-%m-%d"), "cpu": cpu, "cores": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30), "commit": commit}


# --------------------------------------------------------------------------- the docs' blocks


def _score(evaluation: dict) -> str:
    return f"{evaluation['accuracy']:.0%} ({evaluation['correct']}/{evaluation['total']})"


def _demo_text(figures: dict, preset: str, what: str) -> str:
    run = figures[preset]
    m = run["machine"]
    s = run["summary"]
    return (f"Measured by `benchmarks/cpu_figures.py` ({m['cores']}-core CPU, {m['memory_gib']} GiB, {m['date']}, commit "
            f"{m['commit']}): **{what} went from {_score(s['eval_before'])} to {_score(s['eval_after'])}** after "
            f"{s['steps']} LoRA steps; best validation loss {s['best_eval_loss']:.4f} (step {s['best_eval_loss_step']}). "
            f"`qtune run` took {run['wall_s']:.0f} s in all ({s['train_runtime_s']:.0f} s of training), peak resident "
            f"memory {run['peak_rss_gb']:.1f} GB.")


def _export_table(figures: dict) -> str:
    m = figures["exports_machine"]
    rows = [f"Measured by `benchmarks/cpu_figures.py` on the demo's run ({m['cores']}-core CPU, {m['memory_gib']} GiB, "
            f"{m['date']}, commit {m['commit']}), one `qtune export RUN --format F [--quant Q] --verify` process each.", "","| export | export s | verify s | total s | size | peak RSS | top-1 | top-5 | max \\|Δlogit\\| | bound top-1 / top-5 |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for e in figures["exports"]:
        name = f"{e['format']} {e['quant']}" if e["quant"] else e["format"]
        rows.append(f"| {name} | {e['export_s']:.1f} | {e['verify_s']:.1f} | {e['wall_s']:.1f} | {e['bytes'] / 2**20:.1f} MiB "
                    f"| {e['peak_rss_gb']:.2f} GB | {e['top1']:.3f} | {e['top5']:.3f} | {e['max_abs_logit_diff']:.3g} "
                    f"| {e['min_top1']:.2f} / {e['min_top5']:.2f}{'' if e['passed'] else ' (failed)'} |")
    return "\n".join(rows)


#: the lines of the demo's output that README.md shows
DEMO_LINES = ("exact match before", "validation loss", "seconds used for training", "Peak resident memory", "exact match after")


def _demo_output(figures: dict) -> str:
    lines = [line.rstrip() for line in figures["demo"]["output"] if line.strip().startswith(DEMO_LINES)]
    return "```\n" + "\n".join(lines) + "\n```"


def _gguf_verify(figures: dict) -> str:
    q4 = next(e for e in figures["exports"] if e["format"] == "gguf" and e["quant"] == "q4_k_m")
    start = next(i for i, line in enumerate(q4["output"]) if line.startswith("verify "))
    end = next(i for i, line in enumerate(q4["output"]) if i > start and line.strip() in ("passed", "failed"))
    return "```\n" + "\n".join(line.rstrip() for line in q4["output"][start:end + 1]) + "\n```"


def blocks(figures: dict) -> dict[str, str]:
    """The text of each marked block, rendered from the figures."""
    out = {}
    if "demo" in figures:
        out["demo"] = _demo_text(figures, "demo", "exact match on 100 held-out tasks")
        out["demo-output"] = _demo_output(figures)
    if "chat-demo" in figures:
        out["chat-demo"] = _demo_text(figures, "chat-demo", "exact match of the last answer on 100 held-out conversations")
    if "exports" in figures:
        out["exports"] = _export_table(figures)
        out["gguf-verify"] = _gguf_verify(figures)
    return out


BLOCK = re.compile(r"(<!-- figures:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(\n<!-- /figures:(?P=name) -->)", re.S)


def marked_blocks(text: str) -> dict[str, str]:
    return {m["name"]: m["body"] for m in BLOCK.finditer(text)}


def write_blocks(figures: dict) -> list[str]:
    rendered, changed = blocks(figures), []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        new = BLOCK.sub(lambda m: m.group(1) + rendered.get(m["name"], m["body"]) + m.group(4), text)
        if new != text:
            doc.write_text(new, encoding="utf-8")
            changed.append(str(doc.relative_to(ROOT)))
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="demo,chat-demo,exports", help="what to measure, comma-separated")
    parser.add_argument("--exports", default="", help="with --only exports: measure only these again (gguf/q5_k_m,lora)")
    parser.add_argument("--write", action="store_true", help="rewrite the marked blocks of README.md and docs/export.md")
    opts = parser.parse_args(argv)
    wanted = opts.only.split(",")
    WORK.mkdir(parents=True, exist_ok=True)
    figures = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for preset in ("demo", "chat-demo"):
        if preset in wanted:
            print(f"--- {preset}", flush=True)
            figures[preset] = demo(preset)
            RESULTS.write_text(json.dumps(figures, indent=2) + "\n")  # kept should a later part fail
    if "exports" in wanted:
        run_dir = figures.get("demo", {}).get("run_dir")
        if not run_dir or not Path(run_dir).is_dir():
            sys.exit("exports need the demo's run: measure demo in the same call (--only demo,exports)")
        again = [tuple(item.split("/")) if "/" in item else (item, None) for item in opts.exports.split(",") if item]
        previous = figures.get("exports", []) if again else []
        if not again:  # the caption's machine and commit: those of the last measurement of them all
            figures["exports_machine"] = machine()
        figures["exports"] = []
        for fmt, quant in EXPORTS:
            kept = next((e for e in previous if e["format"] == fmt and (quant is None or e["quant"] == quant)), None)
            if kept and (fmt, quant) not in again:
                figures["exports"].append(kept)
                continue
            print(f"--- export {fmt} {quant or ''}", flush=True)
            figures["exports"].append(export(run_dir, fmt, quant))
            RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    for name, text in blocks(figures).items():
        print(f"\n[{name}]\n{text}")
    if opts.write:
        print("rewrote:", ", ".join(write_blocks(figures)) or "nothing (no block changed)")
    print(f"\nJSON: {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
