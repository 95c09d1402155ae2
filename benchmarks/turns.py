"""Processes that take turns, one optimizer step each, so that two setups meet the host's drifting
speed a second apart instead of minutes apart (bench_seed.py's groups, ``--setups a+b``).

    prepare_turns(work, members, jobs, steps)   in the parent: a FIFO per member, the first token sent
    run_jobs(work, names, jobs, timeout, log)   in the parent: start them all, wait under one deadline
    Turns.from_env()                            in each member: step_end(step) at every step's end
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from pathlib import Path


class Turns:
    """Optimizer steps taken in turns by the members of a group: a token goes round a ring of FIFOs,
    and only the process holding it trains.

    The parent writes the first token into the first member's FIFO (BENCH_TURN_IN) and keeps it open;
    each member passes the token to the next (BENCH_TURN_OUT) at every step's end, then waits for it
    to come back, until its last step (BENCH_TURN_LAST). A partner that dies ends the turns after
    ``patience`` seconds: the member then trains on alone, and its result says at which step.
    """

    def __init__(self, mine: str, next_member: str, last_step: int, patience: float = 300.0) -> None:
        # O_RDWR: opening a FIFO so never blocks, and the token outlives a writer that closed
        self.inbox = os.open(mine, os.O_RDWR)
        self.outbox = os.open(next_member, os.O_RDWR)
        self.last_step, self.patience = last_step, patience
        self.holding, self.waited_s, self.broken_at = False, 0.0, None

    def step_end(self, step: int) -> None:
        if self.broken_at is not None:
            return
        if self.holding:
            os.write(self.outbox, b"t")
            self.holding = False
        if step >= self.last_step:
            return
        started = time.perf_counter()
        if select.select([self.inbox], [], [], self.patience)[0]:
            os.read(self.inbox, 1)
            self.holding = True
        else:
            self.broken_at = step
        self.waited_s += time.perf_counter() - started

    @classmethod
    def from_env(cls) -> Turns | None:
        env = os.environ
        return cls(env["BENCH_TURN_IN"], env["BENCH_TURN_OUT"], int(env["BENCH_TURN_LAST"])) if env.get("BENCH_TURN_IN") else None


def prepare_turns(work: Path, members: list[str], jobs: list[dict], steps: int) -> int:
    """A FIFO per member in ``work``, each member's env naming its own and the next one's, and the
    first token in the first member's FIFO. Returns the descriptor that keeps the token alive (a
    FIFO's data goes when its last open end closes): close it when the group is done."""
    fifos = []
    for setup in members:
        fifos.append(Path(work) / f"turn-{setup}")
        fifos[-1].unlink(missing_ok=True)
        os.mkfifo(fifos[-1])
    for i, job in enumerate(jobs):
        job["env"].update(BENCH_TURN_IN=str(fifos[i]), BENCH_TURN_OUT=str(fifos[(i + 1) % len(fifos)]), BENCH_TURN_LAST=str(steps))
    token = os.open(fifos[0], os.O_RDWR)
    os.write(token, b"t")
    return token


def run_jobs(work: Path, names: list[str], jobs: list[dict], timeout: float, log: list[str]) -> list[tuple[int, float, str]]:
    """Start every job (``{"cmd", "env"}``) at once in ``work`` and wait for all under one deadline:
    (exit status, seconds, output) for each, exit status 124 for one stopped at the deadline. The
    end of each one's output goes into ``log``."""
    started = time.perf_counter()
    print(f"--- {' + '.join(names)} (timeout {timeout:.0f} s)", flush=True)
    procs = []
    for name, job in zip(names, jobs, strict=True):
        logfile = open(Path(work) / f"log-{name}.txt", "w+")  # noqa: SIM115 (closed below)
        procs.append((subprocess.Popen(job["cmd"], stdout=logfile, stderr=subprocess.STDOUT, env=job["env"], cwd=work), logfile))
    outcomes = []
    for name, (proc, logfile) in zip(names, procs, strict=True):
        try:
            rc = proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = 124
        wall = time.perf_counter() - started
        with logfile:
            logfile.seek(0)
            output = logfile.read()
        log.append(f"===== {name} rc={rc} wall={wall:.1f}s =====\n" + "\n".join(output.splitlines()[-120:]))
        print(f"    {name}: rc={rc} wall={wall:.1f} s", flush=True)
        if rc != 0:
            print("\n".join(output.splitlines()[-25:]), flush=True)
        outcomes.append((rc, wall, output))
    return outcomes
