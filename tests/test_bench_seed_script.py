"""benchmarks/bench_seed.py's plumbing on the CPU: the side-by-side groups, the setups' commands and
the pooled report. (The setups themselves need a CUDA GPU and run through the device tool.)"""

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


def test_side_by_side_groups_swap_cpu_halves(bench):
    cpus = list(range(16))
    first, second = bench.cpu_shares(cpus, 2, 0), bench.cpu_shares(cpus, 2, 1)
    assert first == [list(range(8)), list(range(8, 16))]
    assert second == [first[1], first[0]]  # a+b, a2+b2: (b) gets the half (a) had
    assert bench.cpu_shares([0], 2, 1) == [[0], [0]]


def test_run_jobs_pins_each_process_to_its_share(bench):
    available = sorted(os.sched_getaffinity(0))
    shares = bench.cpu_shares(available, 2, 1)
    code = "import os; print(sorted(os.sched_getaffinity(0)))"
    log: list[str] = []
    outcomes = bench._run_jobs(["x", "y"], [[sys.executable, "-c", code]] * 2, [dict(os.environ)] * 2, 60, log, shares)
    assert [rc for rc, _, _ in outcomes] == [0, 0]
    assert [json.loads(out) for _, _, out in outcomes] == shares
    assert len(log) == 2 and "side by side" in log[0]


def test_run_jobs_runs_one_setup_unpinned_and_stops_it_at_the_deadline(bench):
    log: list[str] = []
    [(rc, _, output)] = bench._run_jobs(["one"], [[sys.executable, "-c", "print('hello')"]], [dict(os.environ)], 60, log, [None])
    assert (rc, output.strip()) == (0, "hello") and "side by side" not in log[0]
    [(rc, wall, _)] = bench._run_jobs(["slow"], [[sys.executable, "-c", "import time; time.sleep(30)"]], [dict(os.environ)], 1, log, [None])
    assert rc == 124 and wall < 20


def test_setup_names_become_the_right_commands(bench, tmp_path):
    opts = SimpleNamespace(warmup=4, steps=14, warmup_run_steps=3)
    model, data = tmp_path / "model", tmp_path / "data.json"

    def job(name):
        return bench._worker_job(name, opts, {}, model, data, tmp_path)

    notebook = json.loads(job("a2")["cmd"][3])
    assert job("a2")["cmd"][2] == "_notebook" and notebook["pretokenized"] is False and notebook["steps"] == 14
    assert json.loads(job("at")["cmd"][3])["pretokenized"] is True
    assert job("d")["cmd"][2] == "_transformers"
    seed = job("bf")
    assert seed["cmd"][-2:] == ["run", str(bench.WORK / "config-bf.yaml")]
    assert "'logging_nan_inf_filter': False" in seed["cmd"][2] and "(logging_nan_inf_filter=False)" in seed["label"]
    assert '"profile": "seed"' in (bench.WORK / "config-bf.yaml").read_text()
    job("c")
    assert '"profile": "fast"' in (bench.WORK / "config-c.yaml").read_text()
    assert job("bp")["env"]["BENCH_PROFILE"] == str(tmp_path / "profile-bp.txt")
    assert job("bn")["cmd"][-1] == "--no-progress"
    assert json.loads(job("aq")["cmd"][3])["qtune_env"] is True and "qtune's process environment" in job("aq")["label"]
    assert json.loads(job("a")["cmd"][3])["qtune_env"] is False
    assert job("bh")["env"]["BENCH_PHASES"] == "1" and "BENCH_PHASES" not in job("b")["env"]
    assert job("bM")["env"]["MALLOC_MMAP_THRESHOLD_"] == str(32 << 20)
    assert "_t.call_with_frame_room = lambda f, *a, **k: f(*a, **k)" in job("br")["cmd"][2]
    assert "call_with_frame_room" not in job("b")["cmd"][2]
    assert json.loads(job("aR")["cmd"][3])["frame_room"] is True


def test_report_pools_repeats_and_checks_the_targets(bench, tmp_path, capsys):
    def result(tokens_per_s, peak=6.2):
        return {"label": "x", "tokens_per_s": tokens_per_s, "s_per_step": 1.0, "tokens_per_step": tokens_per_s,
                "peak_reserved_gib": peak}

    report = {"results": {"a": result(1000), "b": result(900), "a2": result(1200), "b2": result(1100),
                          "c": result(9000, 65.2), "w": result(500)}}
    steps = {"a": [1.0, 1.0, 2.0], "b": [1.25, 1.0, 2.0], "a2": [3.0, 1.0, 1.0], "b2": [4.0, 1.0, 2.0]}
    for name, step_s in steps.items():
        report["results"][name].update(step_s=step_s, step_tokens=[10, 12, 9])
    bench._finish(report, [], tmp_path)
    checks = report["checks"]
    # a/b per step, pooled over both pairs: 0.8, 1, 1, 0.75, 1, 0.5 -> median (upper) 1.0
    assert checks["b/a median step-by-step speed ratio, 2 pairs"] == 1.0
    assert checks["b/a median step-by-step speed ratio"] == 1.0
    assert checks["b/a tokens/s >= 0.97"] == 0.9
    assert checks["b/a tokens/s, means of 2 and 2 runs"] == round(1000 / 1100, 3)
    assert checks["c/a tokens/s >= 6 (target 8)"] == 9.0
    assert checks["|b-a| peak reserved <= 0.25 GiB"] == 0.0
    assert "w" not in report["pooled"]  # the untimed warm-up run is left out
    assert json.loads((tmp_path / "bench_seed.json").read_text())["checks"] == checks
    assert "b/a tokens/s, means of 2 and 2 runs: 0.909" in capsys.readouterr().out


def test_python_call_counter_counts_each_function_start(bench):
    def tick():
        return 1

    counter = bench.PythonCallCounter()
    counter.start()
    for _ in range(7):
        tick()
    counter.stop()
    counts = {code.co_name: n for code, n in counter.counts.items()}
    assert counts["tick"] == 7
    table = counter.table(steps=1)
    assert table.splitlines()[0].startswith("python function starts:") and "tick" in table
    tick()  # stopped: no longer counted
    assert {code.co_name: n for code, n in counter.counts.items()}["tick"] == 7


def test_counter_deltas_charge_cpu_time_to_the_busy_thread(bench):
    import threading
    import time

    before = bench.all_counters()
    started = time.process_time()
    while time.process_time() - started < 0.3:  # this thread busy for 0.3 s of CPU
        pass
    deltas = bench.counter_deltas(before, bench.all_counters())
    me = next(v for k, v in deltas["thread_counters"].items() if k.endswith(f"/{threading.get_native_id()}"))
    assert me["user_s"] + me["sys_s"] >= 0.2
    assert set(deltas["steal_s_by_cpu"]) == {str(c) for c in os.sched_getaffinity(0)}
    assert deltas["minor_faults"] >= 0 and deltas["major_faults"] >= 0
    before = bench.all_counters()
    subprocess.run(["true"], check=True)
    assert bench.counter_deltas(before, bench.all_counters())["forks_on_machine"] >= 1


def test_phase_meter_splits_the_main_thread_by_forward_and_optimizer(bench):
    import torch

    model = torch.nn.Linear(256, 256)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    meter = bench.PhaseMeter()
    meter.attach(model)
    model(torch.ones(1, 256))  # not counted: the meter starts at the warm-up's end
    assert meter.totals == {}
    meter.start()
    for _ in range(3):
        model(torch.ones(64, 256)).sum().backward()
        optimizer.step()
        meter.checkpoint()
    report = meter.report(steps=3)
    assert set(report) == {"forward", "optimizer", "rest", "all"}
    assert report["all"]["user_ms"] + report["all"]["sys_ms"] >= report["forward"]["user_ms"]
    assert all(v["faults"] >= 0 for k, v in report.items() if k != "rest")


def test_python_arena_counters_see_arenas_mapped_and_unmapped():
    # In a fresh interpreter (a long-lived one has free room in its arenas): ~8 MiB of small objects
    # made and freed three times maps fresh arenas and unmaps them again.
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import bench_seed\n"
        "before = bench_seed.python_arena_counters()\n"
        "for _ in range(3):\n    objects = [(i,) for i in range(200_000)]\n    del objects\n"
        "after = bench_seed.python_arena_counters()\n"
        "print(json.dumps({k: after[k] - before[k] for k in ('allocated_total', 'reclaimed')}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(SCRIPT.parent)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    delta = json.loads(proc.stdout.strip().splitlines()[-1])
    assert delta["allocated_total"] >= 3 and delta["reclaimed"] >= 3, delta


TURN_MEMBER = """
import os, sys, time, importlib.util
spec = importlib.util.spec_from_file_location("bench_seed", {script!r})
bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
turns = bench.Turns.from_env()
name, log = sys.argv[1], sys.argv[2]
turns.step_end(0)  # on_train_begin: wait for the first turn
for step in range(1, int(os.environ["BENCH_TURN_LAST"]) + 1):
    started = time.perf_counter()
    time.sleep(0.05)  # the step's work
    with open(log, "a") as handle:
        handle.write(f"{{name}} {{step}} {{started}} {{time.perf_counter()}}\\n")
    turns.step_end(step)
print(round(turns.waited_s, 3), turns.broken_at)
"""


def test_turns_let_one_member_train_at_a_time_step_by_step(bench, tmp_path):
    opts = SimpleNamespace(steps=5, warmup_run_steps=3)
    members = ["a", "b"]
    jobs = [{"env": dict(os.environ)} for _ in members]
    log_file = tmp_path / "steps.txt"
    code = TURN_MEMBER.format(script=str(SCRIPT))
    token = bench._prepare_turns(members, jobs, opts)
    try:
        outcomes = bench._run_jobs(members, [[sys.executable, "-c", code, m, str(log_file)] for m in members],
                                   [j["env"] for j in jobs], 60, [], [None, None])
    finally:
        os.close(token)
    assert [rc for rc, _, _ in outcomes] == [0, 0], outcomes
    steps = [line.split() for line in log_file.read_text().splitlines()]
    # strictly alternating, a first, and no two steps overlap in time
    assert [(name, int(step)) for name, step, _, _ in steps] == [(m, s) for s in range(1, 6) for m in members]
    spans = [(float(start), float(end)) for _, _, start, end in steps]
    assert all(prev_end <= start for (_, prev_end), (start, _) in zip(spans[:-1], spans[1:], strict=True))
    # each member waited about as long as the other trained, and neither gave up
    for _, _, output in outcomes:
        waited, broken = output.split()
        assert float(waited) >= 4 * 0.05 and broken == "None"
    refused = subprocess.run([sys.executable, str(SCRIPT), "run", "--turns", "--setups", "w+a,b"],
                             capture_output=True, text=True, env=dict(os.environ, BENCH_WORK=str(tmp_path / "w")))
    assert refused.returncode == 2 and "w cannot take turns" in refused.stderr and not (tmp_path / "w").exists()


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
