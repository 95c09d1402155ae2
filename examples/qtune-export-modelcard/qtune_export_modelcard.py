"""A `modelcard` export format for qtune: README.md with the run's config, metrics and training data.

Shipped as its own distribution to show an exporter plugin: it registers through the ``qtune``
entry-point group and imports only qtune's plugin API, ``qtune.api``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qtune.api import Exporter, ExportResult, atomic_dir, hookimpl


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Scalar leaves of nested dicts as (dotted.key, value); lists and long texts are left out."""
    rows: list[tuple[str, Any]] = []
    if isinstance(data, dict):
        for key, value in data.items():
            rows += _flatten(value, f"{prefix}{key}.")
    elif isinstance(data, (int, float, bool)) or (isinstance(data, str) and len(data) <= 80):
        rows.append((prefix.rstrip("."), data))
    return rows


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _table(rows: list[tuple[str, Any]], header: tuple[str, str]) -> list[str]:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {key} | {_value(value)} |" for key, value in rows]
    return lines


def model_card(run) -> str:
    import yaml

    config = run.config
    summary = run.summary()
    exports_file = run.exports_dir / "exports.json"
    exports = json.loads(exports_file.read_text(encoding="utf-8")) if exports_file.is_file() else {}
    dataset = config.dataset
    front = {
        "base_model": config.model.name,
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "tags": ["qtune", "lora", f"template:{config.template}"],
    }
    if dataset.path and not Path(dataset.path).expanduser().exists():
        front["datasets"] = [dataset.path]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    lines += [f"# {run.run_dir.name}", "",
              f"A LoRA fine-tune of `{config.model.name}` made with [qtune](https://pypi.org/project/qtune/).", ""]

    lora, training = config.lora, config.training
    lines += ["## Training", ""]
    lines += _table([
        ("LoRA rank / alpha / dropout", f"{lora.r} / {lora.alpha} / {lora.dropout}"),
        ("target modules", ", ".join(lora.target_modules)),
        ("4-bit base (QLoRA)", config.model.load_in_4bit),
        ("max sequence length", config.model.max_seq_length),
        ("batch size x accumulation", f"{training.per_device_train_batch_size} x {training.gradient_accumulation_steps}"),
        ("steps", training.max_steps if training.max_steps > 0 else f"{training.num_train_epochs} epochs"),
        ("learning rate / scheduler", f"{training.learning_rate} / {training.lr_scheduler_type}"),
        ("optimizer", training.optim),
        ("seed", training.seed),
    ], ("setting", "value"))

    lines += ["", "## Training data", ""]
    data_rows = [("loader", dataset.loader), ("path", dataset.path), ("split", dataset.split)]
    if dataset.limit:
        data_rows.append(("rows used (limit)", dataset.limit))
    if dataset.eval_size:
        data_rows.append(("held out for evaluation", dataset.eval_size))
    data_rows += [(f"data.{k}", v) for k, v in _flatten(summary.get("data", {}))]
    lines += _table(data_rows, ("item", "value"))

    metrics = [(k, v) for k, v in _flatten({k: v for k, v in summary.items() if k not in ("data", "exports")})]
    lines += ["", "## Metrics", ""]
    lines += _table(metrics, ("metric", "value")) if metrics else ["No summary.json: the run has not finished."]

    template = run.template
    example = {name: "" for name in template.optional_fields}
    example.update({name: "..." for name in template.fields})
    lines += ["", "## Prompt format", "", f"Template `{config.template}`; a prompt looks like this (the answer follows):",
              "", "```", template.render_prompt(example), "```"]

    if exports:
        lines += ["", "## Exports", "", "| folder | format | quant | size | verified |", "|---|---|---|---|---|"]
        for folder, record in sorted(exports.items()):
            verify = record.get("verify") or {}
            verified = "-" if not verify else ("passed" if verify.get("passed") else "failed")
            if verify.get("top1_agreement") is not None:
                verified += f" (top-1 {verify['top1_agreement']:.3f})"
            size = record.get("bytes")
            lines.append(f"| {folder} | {record.get('format')} | {record.get('quant') or '-'} | "
                         f"{f'{size / 2**20:.1f} MiB' if size else '-'} | {verified} |")

    lines += ["", "## Configuration", "", "```yaml", config.to_yaml().rstrip(), "```", ""]
    return "\n".join(lines)


class ModelCardExporter(Exporter):
    name = "modelcard"
    description = "README.md model card: config, metrics from summary.json, training data, exports"

    def export(self, run, out_dir: Path, quantization: str | None) -> ExportResult:
        with atomic_dir(out_dir) as tmp:
            (tmp / "README.md").write_text(model_card(run), encoding="utf-8")
        return ExportResult(self.name, Path(out_dir), [Path(out_dir) / "README.md"])


@hookimpl
def register_exporters(register):
    register(ModelCardExporter())
