"""Training on several processes (docs/distributed.md), for real: `qtune run --cpu-processes 2` starts
two ranks through torch's launcher, which train the tiny Qwen2 with DDP over gloo on this CPU.

The reference for "the same training" is one process with twice the per-device batch: the two
ranks' micro-batches of b make up the one process's batch of 2b (the same shuffled order, split
batch by batch between the ranks), DDP averages the gradients, and transformers normalises the loss
by the tokens of the whole step, so the losses, gradient norms and adapter must agree to float
rounding.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from helpers import ALPACA_ROWS, OFFLINE_ENV, QTUNE, logged_steps, one_line_error, read_metrics, tiny_run_config, write_jsonl
from helpers import run_qtune as qtune

STEPS = 4
ROWS = ALPACA_ROWS * 4  # 16 rows: 4 steps of 4 examples


def steps(run_dir: Path) -> list[dict]:
    return [m for m in read_metrics(run_dir) if "step" in m]


def adapter_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_training(a: Path, b: Path) -> None:
    sa, sb = steps(a), steps(b)
    assert [m["step"] for m in sa] == [m["step"] for m in sb] == list(range(1, len(sa) + 1))
    for x, y in zip(sa, sb, strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-4, (x, y)
        assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-3 * max(1.0, x["grad_norm"]), (x, y)
    wa, wb = adapter_weights(a), adapter_weights(b)
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-4


def config_for(tmp_path: Path, model_dir: Path, name: str, batch: int, **training) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    data = write_jsonl(folder / "data.jsonl", ROWS)
    return tiny_run_config(folder, model_dir, data, name=name,
                           training={"per_device_train_batch_size": batch, "max_steps": STEPS, **training})


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_qwen_dir):
    """One finished 2-process run (batch 2 per rank) and its output; shared by the tests below."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    config = config_for(tmp_path, tiny_qwen_dir, "ddp", 2, save_steps=2)
    started = time.perf_counter()
    result = qtune("run", config, "--cpu-processes", "2", "--no-progress")
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp_path / "ddp" / "runs" / "ddp", result, seconds


@pytest.mark.slow
def test_two_ranks_train_like_one_process_with_twice_the_batch(two_ranks, tmp_path, tiny_qwen_dir):
    run_dir, result, seconds = two_ranks
    print(f"2-process run: {seconds:.1f} s")
    single = qtune("run", config_for(tmp_path, tiny_qwen_dir, "single", 4), "--no-progress")
    assert single.returncode == 0, single.stderr[-3000:]
    single_dir = tmp_path / "single" / "runs" / "single"
    assert_same_training(single_dir, run_dir)
    # tokens are counted on each rank and summed: the same examples hold the same tokens
    assert [m["num_tokens"] for m in steps(run_dir)] == [m["num_tokens"] for m in steps(single_dir)]

    # rank 0 alone reports and writes: one header, one summary, one record per step
    assert result.stdout.count("run directory:") == 1 and result.stdout.count("run summary") == 1
    assert "training on 2 CPU processes, ddp" in result.stdout
    assert json.loads((run_dir / "distributed.json").read_text())["processes"] == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["distributed"] == {"processes": 2, "device": "cpu", "strategy": "ddp"}
    peaks = summary["memory"]["rank_peaks_gib"]
    assert len(peaks) == 2 and all(p > 0.1 for p in peaks)
    assert "Peak resident memory by rank: 0:" in result.stdout
    # rank 1's output went to its log, not to the terminal
    assert list((run_dir / "logs").rglob("1/stdout.log"))


@pytest.mark.slow
def test_a_run_trained_on_two_processes_exports(two_ranks):
    run_dir, _, _ = two_ranks
    result = qtune("export", run_dir, "--format", "merged-16bit")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    record = json.loads((run_dir / "exports" / "exports.json").read_text())
    (entry,) = record.values()
    assert entry["verify"]["passed"], entry  # the merged model's logits match base + adapter


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the worker of ``rank`` started by ``launcher`` (read from /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid != launcher:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    return None


@pytest.mark.slow
def test_kill_9_of_one_rank_stops_all_in_one_line_and_resumes_on_one_process(two_ranks, tmp_path, tiny_qwen_dir):
    from qtune.run import checkpoint_is_complete

    straight, _, _ = two_ranks
    config = config_for(tmp_path, tiny_qwen_dir, "killed", 2, save_steps=2)
    run_dir = tmp_path / "killed" / "runs" / "killed"
    proc = subprocess.Popen([QTUNE, "run", str(config), "--cpu-processes", "2", "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **OFFLINE_ENV})
    deadline = time.monotonic() + 400
    victim = rank0 = None
    while proc.poll() is None and time.monotonic() < deadline:
        if checkpoint_is_complete(run_dir / "checkpoints" / "checkpoint-2") and 3 in logged_steps(run_dir / "metrics.jsonl"):
            victim, rank0 = _rank_pid(proc.pid, 1), _rank_pid(proc.pid, 0)
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            break
        time.sleep(0.02)
    assert victim is not None, "the run ended before it could be killed"
    stdout, stderr = proc.communicate(timeout=60)
    stopped_after = time.monotonic() - killed_at
    # torch elastic notices within 0.1 s and stops rank 0 (SIGTERM, SIGKILL 5 s later); under 15 s and 18 s were
    # measured with six jobs sharing two cores, so the bound leaves room for a loaded CI machine
    assert stopped_after < 30, stopped_after
    line = one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    assert line.startswith("Error: rank 1 ") and "killed by SIGKILL" in line, line
    assert "checkpoint-2 is complete: resume with `qtune run --resume" in line, line
    assert not Path(f"/proc/{rank0}").exists() or "zombie" in Path(f"/proc/{rank0}/status").read_text()
    assert not (run_dir / "adapter").exists()

    # Resumed on ONE process: accumulation 2 keeps 4 examples per step, so the run goes on as it was.
    resumed = qtune("run", "--resume", run_dir, "--no-progress")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from checkpoint-2" in resumed.stdout
    assert "gradient accumulation becomes 2" in " ".join(resumed.stdout.split())
    assert_same_training(straight, run_dir)
    assert json.loads((run_dir / "distributed.json").read_text())["processes"] == 1


@pytest.mark.slow
def test_ctrl_c_to_the_launcher_stops_every_rank_in_one_line(tmp_path, tiny_qwen_dir):
    config = config_for(tmp_path, tiny_qwen_dir, "interrupted", 2)
    proc = subprocess.Popen([QTUNE, "run", str(config), "--cpu-processes", "2", "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **OFFLINE_ENV})
    deadline = time.monotonic() + 300
    ranks = [None, None]
    while proc.poll() is None and time.monotonic() < deadline and None in ranks:
        ranks = [_rank_pid(proc.pid, 0), _rank_pid(proc.pid, 1)]
        time.sleep(0.1)
    assert None not in ranks, "the ranks never started"
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends (a terminal sends it to the ranks as well)
    interrupted_at = time.monotonic()
    stdout, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - interrupted_at < 20
    line = one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    assert line.startswith("Error: interrupted (SIGINT); all 2 processes were stopped"), line
    for pid in ranks:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


# --------------------------------------------------------------------------- one-line refusals, no weights loaded


def test_asking_for_gpus_that_are_not_there_is_one_line(tmp_path, tiny_qwen_dir):
    config = config_for(tmp_path, tiny_qwen_dir, "nogpu", 2)
    line = one_line_error(qtune("run", config, "--gpus", "2"))
    assert "--gpus 2 asks for more GPUs than this machine has (no CUDA GPU visible)" in line
    assert not (tmp_path / "nogpu" / "runs").exists()
    assert "not both" in one_line_error(qtune("run", config, "--gpus", "1", "--cpu-processes", "2"))


def test_fsdp_on_the_cpu_is_refused_in_one_line(tmp_path, tiny_qwen_dir):
    config = config_for(tmp_path, tiny_qwen_dir, "fsdpcpu", 2, distributed="fsdp")
    line = one_line_error(qtune("run", config, "--cpu-processes", "2"))
    assert "training.distributed: fsdp needs GPUs" in line
    assert not (tmp_path / "fsdpcpu" / "runs").exists()


def test_bad_data_is_refused_before_any_process_starts(tmp_path, tiny_qwen_dir):
    config = config_for(tmp_path, tiny_qwen_dir, "baddata", 2)
    rows = [dict(r) for r in ROWS]
    rows[2]["output"] = ""
    write_jsonl(tmp_path / "baddata" / "data.jsonl", rows)
    line = one_line_error(qtune("run", config, "--cpu-processes", "2"))
    assert "dataset row 2, field 'output': is empty" in line
    assert not (tmp_path / "baddata" / "runs").exists()


def _config(**sections):
    from qtune.config import validate

    return validate(sections)


def _backend(name):
    from qtune.plugin_manager import get_host

    return get_host().backends.get(name)


def test_auto_chooses_ddp_when_a_replica_fits_and_fsdp_when_only_shards_do():
    from qtune.distributed import plan

    # Qwen2.5-7B at the seed's settings: ~6.3 GiB measured on an H200 (FACTS.md), so an 80 GiB card holds it
    small = plan(_config(model={"name": "qwen2.5-7b"}), 2, "cuda", _backend("transformers"), gpus_present=2, gpu_gib=80)
    assert small.strategy == "ddp" and "fits one of the 80 GiB GPUs" in small.reason
    # Llama-3.1-70B: its 4-bit decoder weights alone are 68.5e9 x 0.516 bytes = 32.9 GiB; with the rest, over a 40 GiB card
    big = plan(_config(model={"name": "llama-3.1-70b"}), 4, "cuda", _backend("transformers"), gpus_present=4, gpu_gib=40)
    assert big.strategy == "fsdp" and big.shard_gib < 40 * 0.9 < big.replica_gib
    # with backend auto, a backend that cannot shard is swapped for one that can, and the plan says so
    switched = plan(_config(model={"name": "llama-3.1-70b"}), 4, "cuda", _backend("unsloth"), gpus_present=4, gpu_gib=40)
    assert switched.backend == "transformers" and "since unsloth cannot fsdp" in switched.reason


def test_a_model_too_big_even_sharded_and_a_backend_that_cannot_shard_are_refused():
    from qtune.distributed import plan
    from qtune.errors import QtuneError

    with pytest.raises(QtuneError) as error:
        plan(_config(model={"name": "llama-3.1-405b"}), 2, "cuda", _backend("transformers"), gpus_present=2, gpu_gib=80)
    assert "does not fit even sharded over 2 80 GiB GPUs" in str(error.value) and "it needs" in str(error.value)
    with pytest.raises(QtuneError) as error:
        plan(_config(model={"name": "llama-3.1-70b", "backend": "unsloth"}), 4, "cuda", _backend("unsloth"),
             gpus_present=4, gpu_gib=40)
    assert "backend 'unsloth' cannot shard the model (fsdp)" in str(error.value)
    with pytest.raises(QtuneError) as error:
        plan(_config(model={"name": "llama-3.1-70b"}, training={"distributed": "ddp"}), 4, "cuda", _backend("transformers"),
             gpus_present=4, gpu_gib=40)
    assert "ddp puts the whole model on every GPU" in str(error.value)
    for message in (str(error.value),):
        assert "\n" not in message


def test_models_lists_the_gpus_each_model_needs():
    result = qtune("models", "--gpus-of", "80", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert (rows["qwen2.5-7b"]["gpus"], rows["qwen2.5-7b"]["strategy"]) == (1, "single")
    big = rows["llama-3.1-405b"]
    # its 4-bit weights alone (405e9 params x 0.516 bytes) need more than that many usable 80 GiB cards
    floor = 405e9 * 0.516 / 1024**3 / (80 * 0.9)
    assert big["strategy"] == "fsdp" and floor < big["gpus"] <= 8
    table = qtune("models", "--gpus-of", "80", "--family", "llama", env={"COLUMNS": "200"})
    assert "80 GiB GPUs" in table.stdout and "fsdp" in table.stdout


def test_bench_distributed_plans_without_a_gpu(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_distributed.py"
    result = subprocess.run([os.sys.executable, str(script), "run", "--dry-run", "--out", str(tmp_path)], capture_output=True,
                            text=True, env={**os.environ, **OFFLINE_ENV, "BENCH_WORK": str(tmp_path / "work")}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ddp on 2 GPU(s): qtune run" in result.stdout and "fsdp on 2 GPU(s)" in result.stdout
    config = yaml.safe_load((tmp_path / "work" / "fsdp-gpus2.yaml").read_text())
    assert config["training"]["distributed"] == "fsdp" and config["model"]["load_in_4bit"] is True
