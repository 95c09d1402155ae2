"""Built-in dataset loaders: the hub (yahma/alpaca-cleaned and any other), local files, and the
generated offline task set used by the CPU demo."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from qtune.api import DatasetLoader, QtuneError, first_line, hookimpl, missing_path_reason

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class HubLoader(DatasetLoader):
    name = "hub"
    description = "a dataset on the Hugging Face hub (or in its local cache when HF_HUB_OFFLINE=1)"

    def load(self, spec):
        import datasets

        if not spec.path:
            raise QtuneError("dataset.path is empty; set it to a hub id such as yahma/alpaca-cleaned")
        if Path(spec.path).expanduser().exists():
            raise QtuneError(f"dataset.path {spec.path!r} is a local file or folder, but dataset.loader {self.name!r} reads the hub; "
                             f"set dataset.loader to files (or auto)")
        try:
            return datasets.load_dataset(spec.path, spec.subset, split=spec.split)
        except (FileNotFoundError, ConnectionError, OSError) as exc:
            raise QtuneError(
                f"could not load dataset {spec.path!r} split {spec.split!r} from the hub: {first_line(exc)}; "
                f"check the id, go online, or point dataset.path at a local file"
            ) from None
        except ValueError as exc:  # e.g. unknown split
            raise QtuneError(f"dataset {spec.path!r}: {first_line(exc)}") from None


class AlpacaCleanedLoader(HubLoader):
    name = "alpaca-cleaned"
    description = "yahma/alpaca-cleaned, the seed notebook's data (instruction, input, output)"

    def load(self, spec):
        spec = spec.model_copy(update={"path": spec.path if spec.path and spec.path != "alpaca-cleaned" else "yahma/alpaca-cleaned"})
        return super().load(spec)


class LocalFilesLoader(DatasetLoader):
    name = "files"
    description = "local JSON, JSONL, CSV or Parquet files (a file, or a folder of one format)"

    def load(self, spec):
        import datasets

        path = Path(spec.path or "").expanduser()
        if not path.exists():
            raise QtuneError(f"dataset file {str(path)!r} {missing_path_reason(path)}; fix dataset.path")
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in LOCAL_FORMATS) if path.is_dir() else [path]
        if not files:
            raise QtuneError(f"dataset folder {str(path)!r} holds no .json, .jsonl, .csv or .parquet files")
        kinds = {LOCAL_FORMATS.get(p.suffix.lower()) for p in files}
        if None in kinds or len(kinds) != 1:
            raise QtuneError(
                f"dataset {str(path)!r}: use files of one format ending in .json, .jsonl, .csv or .parquet"
            )
        for file in files:
            if file.stat().st_size == 0:
                raise QtuneError(f"dataset file {str(file)!r} is empty; add rows or fix dataset.path")
        try:
            return datasets.load_dataset(kinds.pop(), data_files=[str(p) for p in files], split="train")
        except UnicodeDecodeError:
            raise QtuneError(f"dataset {str(path)!r} is not UTF-8 text; re-save it as UTF-8") from None
        except Exception as exc:  # datasets wraps parser errors in its own types
            cause = exc.__cause__ or exc
            if isinstance(cause, UnicodeDecodeError):
                raise QtuneError(f"dataset {str(path)!r} is not UTF-8 text; re-save it as UTF-8") from None
            raise QtuneError(f"could not read dataset {str(path)!r}: {first_line(cause)}") from None


# --- the generated demo task set --------------------------------------------------------------

WORDS = (
    "apple river stone cloud tiger green music paper light ocean silver garden winter candle forest "
    "mirror rocket yellow bridge pencil window castle planet coffee dragon orange summer basket "
    "thunder violet"
).split()


def _task_sort(rng: random.Random) -> dict[str, str]:
    numbers = rng.sample(range(1, 60), 4)
    return {
        "instruction": "Sort these numbers from smallest to largest.",
        "input": ", ".join(map(str, numbers)),
        "output": ", ".join(map(str, sorted(numbers))),
    }


def _task_reverse(rng: random.Random) -> dict[str, str]:
    words = rng.sample(WORDS, 3)
    return {"instruction": "Reverse the order of these words.", "input": " ".join(words), "output": " ".join(reversed(words))}


def _task_uppercase(rng: random.Random) -> dict[str, str]:
    words = rng.sample(WORDS, 2)
    return {"instruction": "Write these words in capital letters.", "input": " ".join(words), "output": " ".join(words).upper()}


def _task_add(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(10, 49), rng.randint(10, 49)
    return {"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)}


def _task_last_word(rng: random.Random) -> dict[str, str]:
    words = rng.sample(WORDS, 4)
    return {"instruction": "Give the last word of the list.", "input": " ".join(words), "output": words[-1]}


DEMO_TASKS = (_task_sort, _task_reverse, _task_uppercase, _task_add, _task_last_word)
DEMO_SYSTEM = "Reply with the answer only."


def generate_demo_tasks(size: int, seed: int) -> list[dict[str, str]]:
    """Deterministic instruction/input/output rows with one exact answer each."""
    rng = random.Random(seed)
    rows = []
    for index in range(size):
        row = DEMO_TASKS[index % len(DEMO_TASKS)](rng)
        row["system"] = DEMO_SYSTEM
        rows.append(row)
    return rows


class DemoTasksLoader(DatasetLoader):
    name = "demo-tasks"
    description = "generated offline tasks with exact answers (sort, reverse, capitals, add, last word)"

    def load(self, spec):
        import datasets

        return datasets.Dataset.from_list(self.generate(*self.size_and_seed(spec)))

    def generate(self, size: int, seed: int) -> list[dict[str, Any]]:
        return generate_demo_tasks(size, seed)

    def size_and_seed(self, spec) -> tuple[int, int]:
        options: dict[str, Any] = dict(spec.options)
        unknown = set(options) - {"size", "seed"}
        if unknown:
            raise QtuneError(f"dataset.options for {self.name} takes size and seed, not {', '.join(sorted(unknown))}")
        size, seed = options.get("size", 1000), options.get("seed", 0)
        if not isinstance(size, int) or size <= 0:
            raise QtuneError(f"dataset.options.size must be a positive whole number, not {size!r}")
        return size, int(seed)


# --- the generated demo conversations ------------------------------------------------------------

ORDINALS = ("first", "second", "third", "fourth")


def _recall(rng: random.Random, words: list[str]) -> tuple[str, str]:
    """A question about the words given in the first turn, and its one exact answer."""
    kind = rng.randrange(5)
    if kind == 0:
        position = rng.randrange(len(words))
        return f"What was the {ORDINALS[position]} word I gave you?", words[position]
    if kind == 1:
        return "Repeat my words in reverse order.", " ".join(reversed(words))
    if kind == 2:
        return "Write my words in capital letters.", " ".join(words).upper()
    if kind == 3:
        return "Which of my words comes first in alphabetical order?", min(words)
    return "Repeat my words.", " ".join(words)


def generate_demo_conversations(size: int, seed: int) -> list[dict[str, Any]]:
    """Deterministic three-exchange conversations whose last answer depends on the first turn: the
    user gives words to remember, asks an unrelated task in between, then asks about the words."""
    rng = random.Random(seed)
    rows = []
    for index in range(size):
        words = rng.sample(WORDS, 4)
        middle = DEMO_TASKS[index % len(DEMO_TASKS)](rng)
        question, answer = _recall(rng, words)
        rows.append({"messages": [
            {"role": "system", "content": DEMO_SYSTEM},
            {"role": "user", "content": f"Remember these words: {' '.join(words)}."},
            {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": f"{middle['instruction']} {middle['input']}"},
            {"role": "assistant", "content": middle["output"]},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]})
    return rows


class DemoChatLoader(DemoTasksLoader):
    name = "demo-chat"
    description = "generated offline conversations whose last answer depends on the first turn (words to remember)"

    def generate(self, size: int, seed: int) -> list[dict[str, Any]]:
        return generate_demo_conversations(size, seed)


@hookimpl
def register_dataset_loaders(register):
    register(HubLoader())
    register(AlpacaCleanedLoader())
    register(LocalFilesLoader())
    register(DemoTasksLoader())
    register(DemoChatLoader())
