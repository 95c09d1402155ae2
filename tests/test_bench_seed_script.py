"""benchmarks/bench_seed.py's plumbing on the CPU: setup names and their commands, the token counter,
the turns, the report, and a tiny smoke run of (b) in turns. (The real setups need a CUDA GPU.)"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_seed.py"


@pytest.fixture()
def bench(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_seed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "WORK", tmp_path / "work")
    (tmp_path / "work").mkdir()
    return module


def test_setup_names_become_the_right_commands(bench, tmp_path):
    opts = SimpleNamespace(warmup=4, steps=14, shape="7B")
    model, data = tmp_path / "model", tmp_path / "data.json"

    def job(name):
        return bench.setup_job(name, opts, {"X": "1"}, model, data)

    notebook = job("a2")
    assert notebook["cmd"][1:3] == [bench.__file__, "_notebook"] and notebook["label"] == "Unsloth notebook (packing off)"
    assert json.loads(notebook["cmd"][3]) == {"model": str(model), "data": str(data), "steps": 14, "warmup": 4}
    assert notebook["env"] == {"X": "1", "BENCH_RESULT": str(bench.WORK / "result-a2.json")}
    assert job("d")["cmd"][2] == "_transformers"
    seed = job("b")
    assert seed["cmd"][-2:] == ["run", str(bench.WORK / "config-b.yaml")] and "qtune_cli.main" in seed["cmd"][2]
    config = (bench.WORK / "config-b.yaml").read_text()
    assert '"profile": "seed"' in config and '"max_steps": 14' in config and "bench_timer" in config
    assert "gradient_accumulation_steps" not in config  # the seed's 4 (a smoke run on the CPU takes 1)
    job("c3")
    assert '"profile": "fast"' in (bench.WORK / "config-c3.yaml").read_text()
    # an unknown setup is refused before anything is built
    refused = subprocess.run([sys.executable, str(SCRIPT), "run", "--setups", "a+x"], capture_output=True, text=True,
                             env=dict(os.environ, BENCH_WORK=str(tmp_path / "w")))
    assert refused.returncode == 2 and "unknown setup 'x'" in refused.stderr and not (tmp_path / "w").exists()


def test_step_timer_counts_non_pad_tokens_and_times_steps_after_the_warmup(bench, monkeypatch):
    import torch

    class Model(torch.nn.Module):
        def forward(self, input_ids=None, attention_mask=None):
            return input_ids

    clock = iter([10.0, 11.0, 13.0, 16.0])  # steps 0-3 end at these times
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    timer, model = bench.StepTimer(warmup=1), Model()
    timer.attach(model)  # step 0
    model(input_ids=torch.ones(2, 4), attention_mask=torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]))
    timer.step_end(1)  # 4 tokens, warm-up
    model(input_ids=torch.ones(2, 4), attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    timer.step_end(2)  # 6 tokens in 2 s
    model(input_ids=torch.ones(1, 10))  # packed: no mask, no padding
    timer.step_end(3)  # 10 tokens in 3 s
    result = timer.result()
    assert result["step_tokens"] == [6, 10]
    assert (result["steps_timed"], result["s_per_step"], result["tokens_per_s"], result["tokens_per_step"]) == (2, 2.5, 16 / 5, 8)


def test_run_jobs_runs_them_at_once_and_stops_them_at_the_deadline(bench):
    log: list[str] = []
    sleep = [sys.executable, "-c", "import time; time.sleep(1); print('done')"]
    started = bench.time.perf_counter()
    outcomes = bench.run_jobs(bench.WORK, ["x", "y"], [{"cmd": sleep, "env": dict(os.environ)}] * 2, 60, log)
    assert [(rc, out.strip()) for rc, _, out in outcomes] == [(0, "done"), (0, "done")]
    assert bench.time.perf_counter() - started < 1.9  # together, not one after the other
    [(rc, wall, _)] = bench.run_jobs(bench.WORK, ["slow"], [{"cmd": [sys.executable, "-c", "import time; time.sleep(30)"], "env": dict(os.environ)}], 1, log)
    assert rc == 124 and wall < 20 and len(log) == 3


TURN_MEMBER = """
import json, os, sys, time, importlib.util
spec = importlib.util.spec_from_file_location("bench_seed", {script!r})
bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
timer = bench.StepTimer(warmup=1)
name, log = sys.argv[1], sys.argv[2]
timer.step_end(0)  # at the training's start: wait for the first turn
for step in range(1, int(os.environ["BENCH_TURN_LAST"]) + 1):
    started = time.perf_counter()
    time.sleep(0.2)  # the step's work
    with open(log, "a") as handle:
        handle.write(f"{{name}} {{step}} {{started}} {{time.perf_counter()}}\\n")
    timer.step_end(step)
print(json.dumps(timer.result()))
"""


def test_turns_let_one_member_train_at_a_time_step_by_step(bench, tmp_path):
    members = ["a", "b"]
    log_file = tmp_path / "steps.txt"
    code = TURN_MEMBER.format(script=str(SCRIPT))
    jobs = [{"cmd": [sys.executable, "-c", code, m, str(log_file)], "env": dict(os.environ)} for m in members]
    token = bench.prepare_turns(bench.WORK, members, jobs, steps=5)
    try:
        outcomes = bench.run_jobs(bench.WORK, members, jobs, 120, [])
    finally:
        os.close(token)
    assert [rc for rc, _, _ in outcomes] == [0, 0], outcomes
    steps = [line.split() for line in log_file.read_text().splitlines()]
    # strictly alternating, a first, and no two steps overlap in time
    assert [(name, int(step)) for name, step, _, _ in steps] == [(m, s) for s in range(1, 6) for m in members]
    spans = [(float(start), float(end)) for _, _, start, end in steps]
    assert all(prev_end <= start for (_, prev_end), (start, _) in zip(spans[:-1], spans[1:], strict=True))
    for _, _, output in outcomes:
        result = json.loads(output.strip().splitlines()[-1])
        # each waited about as long as the other trained, neither gave up, and the waits are not timed:
        # a step is its own 0.2 s, not 0.4 s with the partner's
        assert result["turns"]["waited_s"] >= 4 * 0.2 and result["turns"]["broken_at_step"] is None
        assert result["steps_timed"] == 4 and 0.2 <= result["s_per_step"] < 0.3


def test_turns_end_when_the_partner_dies(bench, tmp_path):
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    os.mkfifo(mine)
    os.mkfifo(theirs)
    turns = bench.Turns(str(mine), str(theirs), last_step=5, patience=0.2)
    token = os.open(mine, os.O_RDWR)
    os.write(token, b"t")
    turns.step_end(0)
    assert turns.holding and turns.broken_at is None
    turns.step_end(1)  # passes the token on; nobody answers
    assert turns.broken_at == 1 and not turns.holding and turns.waited_s >= 0.2
    turns.step_end(2)  # then trains on alone, without waiting
    assert turns.broken_at == 1
    os.close(token)


def test_report_gives_ratios_to_a_a_table_and_json(bench, tmp_path, capsys):
    def result(tokens_per_s, peak=6.2):
        return {"label": "x", "rc": 0, "tokens_per_s": tokens_per_s, "s_per_step": 1.0, "tokens_per_step": 10,
                "peak_reserved_gib": peak, "step_tokens": [10, 12, 9]}

    results = {"a": result(1000), "b": result(900, 6.3), "a2": result(1200), "b2": result(1100),
               "c": result(9000, 65.2), "d": {"label": "y", "rc": 124}}
    results["b2"]["in_turns_with"] = ["a2"]
    report = {"date": "today", "build": {"gpu": "H200", "shape": "7B"}, "results": results}
    assert bench.finish(report, ["log"], tmp_path) == 1  # (d) failed
    summary = report["summary"]
    assert results["b"]["ratio_to_a"] == 0.9 and results["b2"]["ratio_to_a"] == 1100 / 1200  # each to its pair's (a)
    assert results["c"]["ratio_to_a"] == 9.0 and results["a2"]["ratio_to_a"] == 1.2  # to the first (a)
    assert summary["ratio_of_means_to_a"] == {"b": round(1000 / 1100, 3), "c": round(9000 / 1100, 3)}
    assert summary["b_minus_a_peak_reserved_gib"] == 0.1
    assert json.loads((tmp_path / "bench_seed.json").read_text())["summary"] == summary
    assert (tmp_path / "bench_logs.txt").read_text() == "log"
    table = capsys.readouterr().out
    assert "H200" in table and "in turns with a2" in table and "rc=124" in table and "b / a, means of the runs: 0.909" in table


@pytest.mark.slow
def test_smoke_run_of_b_in_turns_on_the_cpu(tmp_path, qwen_tokenizer_dir):
    # The whole path of a GPU call, with a tiny model and no Unsloth: checkpoint build, `qtune run`
    # with the bench_timer plugin, two runs taking turns, the JSON and the table.
    bench_dir = tmp_path / "bench"
    (bench_dir / "tokenizer").mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bench_dir / "tokenizer" / name).write_bytes((qwen_tokenizer_dir / name).read_bytes())
    rows = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)} for i in range(40)]
    (bench_dir / "alpaca_en_demo.json").write_text(json.dumps(rows))
    env = dict(os.environ, BENCH_DIR=str(bench_dir), BENCH_WORK=str(tmp_path / "work"))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "run", "--shape", "tiny", "--setups", "b+b2", "--steps", "3", "--warmup", "1",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "bench_seed.json").read_text())
    assert report["build"]["shape"] == "tiny" and report["build"]["nf4"] is False
    for name, partner in (("b", "b2"), ("b2", "b")):
        result = report["results"][name]
        assert result["in_turns_with"] == [partner] and result["turns"]["broken_at_step"] is None
        assert result["steps_timed"] == 2 and result["tokens_per_s"] > 0 and result["backend"] == "transformers"
    assert report["results"]["b"]["step_tokens"] == report["results"]["b2"]["step_tokens"]  # same seed, same batches
    assert "qtune run, seed config" in proc.stdout.splitlines()[-8:][0] or "qtune run, seed config" in proc.stdout
