"""README's install lines, run as written in a fresh virtualenv, give an environment that trains.

Issue 13: `pip install -e '.[gguf]'`, the README's line then, resolved trl 1.15.0, whose SFT loss kernel
fails on the first CPU training step. The lines are read out of README.md's "Using it" section, so
these tests cannot drift from the text, and run with a new virtualenv's own pip (no --no-deps, no
extra pins): torch, transformers, trl, ... come from the declared requirements and constraints.txt,
as a user gets them. pip's cache (under HOME) holds the wheels of earlier installs, including the
llama-cpp-python wheel tox built, which keeps the install to a minute or two here.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from helpers import ALPACA_ROWS, OFFLINE_ENV, read_metrics, tiny_run_config, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def readme_install_blocks() -> dict[str, list[list[str]]]:
    """The code blocks of README's "Using it" made only of `pip install` lines, keyed by the line that
    introduces each ("On a CPU machine:"), every command split as a shell would split it."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Using it\n", 1)[1].split("\n## ", 1)[0]
    blocks = {}
    for intro, body in re.findall(r"([^\n]+)\n\n```bash\n(.*?)```", section, flags=re.S):
        commands = [words for words in map(lambda line: shlex.split(line, comments=True), body.splitlines()) if words]
        if commands and all(words[:2] == ["pip", "install"] for words in commands):
            blocks[intro] = commands
    return blocks


def install_block(machine: str) -> list[list[str]]:
    blocks = {intro: commands for intro, commands in readme_install_blocks().items() if f"{machine} machine" in intro}
    assert len(blocks) == 1, f"README's 'Using it' needs exactly one block of pip lines introduced with '{machine} machine'"
    return next(iter(blocks.values()))


def clean_env(venv: Path) -> dict[str, str]:
    """This process's environment (HOME and PIP_* keep pip's cache and indexes) without the suite's own
    virtualenv, with `venv` first on PATH as if activated."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **OFFLINE_ENV}


def pip(venv: Path, words: list[str], timeout=1200) -> subprocess.CompletedProcess:
    """Run a README `pip ...` line with the virtualenv's pip, from the repository root like a user in a clone."""
    assert words[0] == "pip"
    result = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", *words[1:]], cwd=ROOT, env=clean_env(venv),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{shlex.join(words)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def in_venv(venv: Path, code: str) -> str:
    """What `code` prints when run by the virtualenv's python."""
    return subprocess.run([str(venv / "bin" / "python"), "-c", code], env=clean_env(venv), capture_output=True,
                          text=True, check=True).stdout.strip()


def installed(venv: Path, name: str) -> str:
    return in_venv(venv, f"import importlib.metadata as m; print(m.version({name!r}))")


def would_install(venv: Path, words: list[str], tmp_path: Path) -> dict[str, str]:
    """What `words` (a pip install command) would install into `venv`, by name, from pip's own resolver."""
    report = tmp_path / "report.json"
    pip(venv, [*words[:2], "--dry-run", "--quiet", "--report", str(report), *words[2:]])
    return {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
            for item in json.loads(report.read_text())["install"]}


@pytest.fixture(scope="module")
def readme_cpu_venv(tmp_path_factory):
    """A fresh virtualenv (no access to the suite's packages) after README's CPU install lines."""
    venv = tmp_path_factory.mktemp("readme-install") / "venv"
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
        for words in install_block("CPU"):
            pip(venv, words)
        yield venv
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # about 2 GB; pytest keeps the last three sessions' folders


def test_readme_cpu_install_trains(readme_cpu_venv, tmp_path, tiny_qwen_dir):
    # torch is README's 2.13.0, not replaced by anything the qtune line pulled in
    assert Version(installed(readme_cpu_venv, "torch")).public == "2.13.0"
    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS * 2)
    config = tiny_run_config(tmp_path, tiny_qwen_dir, data, training={"max_steps": 2})
    result = subprocess.run([str(readme_cpu_venv / "bin" / "qtune"), "run", str(config), "--no-progress"],
                            env=clean_env(readme_cpu_venv), capture_output=True, text=True, timeout=900)
    trl = installed(readme_cpu_venv, "trl")
    assert result.returncode == 0, f"qtune run failed with trl {trl}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    steps = [m for m in read_metrics(tmp_path / "runs" / "tiny") if "step" in m]
    assert [m["step"] for m in steps] == [1, 2]
    assert all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in steps)


def test_declared_trl_requirement_excludes_the_releases_that_cannot_train(readme_cpu_venv):
    # qtune's own requirement on trl, as pip wrote it into the installed metadata from setup.cfg: what
    # `pip install -e .` without constraints.txt, or a published qtune, resolves. The bounds are measured
    # outside this code: trl 1.15.x fails on the first CPU training step; unsloth 2026.10.9 requires
    # trl<=1.15.0, so it refuses 1.16 and later (../shared/FACTS.md).
    requires = in_venv(readme_cpu_venv, "import importlib.metadata as m; print(*m.requires('qtune'), sep='\\n')").splitlines()
    trl = next(Requirement(line) for line in requires if Requirement(line).name == "trl")
    assert not trl.marker, trl
    assert trl.specifier.contains("1.14.2"), trl
    refused = [v for v in ("1.15.0", "1.15.1", "1.15.9", "1.16.0", "2.0.0") if trl.specifier.contains(v)]
    assert not refused, f"setup.cfg's {trl} admits trl {refused}, which cannot train on CPU or with unsloth 2026.10.9"


def test_readme_cuda_install_keeps_the_installed_torch(readme_cpu_venv, tmp_path):
    # The torch 2.13.0 installed here stands for a CUDA machine's own: neither CUDA line may replace it.
    for words in install_block("CUDA"):
        plan = would_install(readme_cpu_venv, words, tmp_path)
        assert "torch" not in plan and "torchvision" not in plan, f"{shlex.join(words)} would install {plan}"
