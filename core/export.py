"""Exporting a finished run: pick the exporter plugin, write atomically, verify, record.

``export_run`` serves ``qtune export RUN_DIR --format F`` and ``run_exports`` the config's
``exports:`` list after training. Every export is written to ``RUN_DIR/exports/FORMAT[-QUANT]/``
(or ``out``) through :func:`qtune.fsutil.atomic_dir`, timed, optionally verified in its target
runtime, and recorded in ``RUN_DIR/exports/exports.json`` and under ``exports`` in summary.json.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import QtuneError
from .fsutil import atomic_file, folder_lock, read_json_dict, remove_stale_temporaries, replacing
from .types import Exporter, ExportResult
from .verify import VerifyReport

if TYPE_CHECKING:  # pragma: no cover
    from .config import ExportEntry
    from .run import FinishedRun

EXPORTS_RECORD = "exports.json"


def get_exporter(fmt: str) -> Exporter:
    from .plugin_manager import get_host, normalize_format

    exporters = get_host().exporters
    name = normalize_format(fmt)
    if name not in exporters and fmt in exporters:
        name = fmt
    exporter = exporters.get(name)  # QtuneError naming the closest format
    reason = exporter.unavailable_reason()
    if reason:
        raise QtuneError(f"export format {exporter.name!r} cannot run here: {reason}")
    return exporter


def default_out_dir(run: FinishedRun, exporter: Exporter, quant: str | None) -> Path:
    return run.exports_dir / (exporter.name if quant is None else f"{exporter.name}-{quant}")


def _supports_verify(exporter: Exporter) -> bool:
    return type(exporter).verify is not Exporter.verify


def _export_options(exporter: Exporter, options: dict[str, Any]) -> dict[str, Any]:
    """The options given (not None); one not in ``exporter.options`` is refused with its flag's name."""
    options = {k: v for k, v in options.items() if v is not None}
    refused = [k for k in options if k not in exporter.options]
    if refused:
        flags = ", ".join("--" + k.replace("_", "-") for k in refused)
        takes = f"; it takes: {', '.join(sorted(exporter.options))}" if exporter.options else ""
        raise QtuneError(f"export format {exporter.name!r} does not take {flags}{takes}; leave it out")
    return options


def export_run(
    run: FinishedRun,
    fmt: str,
    quant: str | None = None,
    verify: bool = True,
    out: str | Path | None = None,
    console: Any = None,
    *,
    overwrite: bool = False,
    **options: Any,
) -> ExportResult:
    """Export ``run`` in format ``fmt`` and return the result (``details`` holds timings, size, verify).

    ``options`` go to the exporter when it declares them in ``Exporter.options`` (built-ins:
    ``llama_cpp_dir`` for gguf, ``max_shard_size`` for merged-16bit). ``overwrite`` replaces an
    existing output folder, which is kept until the new export has been written. Raises
    :class:`QtuneError` when verification fails (after recording the report), and one naming the
    plugin when its code fails.
    """
    from rich.console import Console

    from .plugin_manager import get_host

    console = console or Console(stderr=True, highlight=False)
    exporter = get_exporter(fmt)
    host = get_host()
    plugin = host.exporters.owners.get(exporter.name, "?")
    quant = exporter.resolve_quantization(quant)
    options = _export_options(exporter, options)
    out_dir = Path(out).expanduser() if out is not None else default_out_dir(run, exporter, quant)
    label = exporter.name + (f" ({quant})" if quant else "")
    if out_dir.exists() and not overwrite:
        raise QtuneError(f"{str(out_dir)!r} already exists; remove it, pass --force to replace it, or choose --out")
    run.exports_dir.mkdir(parents=True, exist_ok=True)
    with folder_lock(run.exports_dir, f"another qtune process is exporting run {str(run.run_dir)!r}; wait for it to finish"):
        # Under the lock every temporary folder beside an export is a leftover of a killed export.
        remove_stale_temporaries(run.exports_dir)
        remove_stale_temporaries(out_dir.parent, out_dir.name)
        return _export_locked(run, exporter, plugin, quant, verify, out_dir, label, console, overwrite, options)


def _export_locked(run: FinishedRun, exporter: Exporter, plugin: str, quant: str | None, verify: bool, out_dir: Path, label: str,
                   console: Any, overwrite: bool, options: dict[str, Any]) -> ExportResult:
    from .plugin_manager import get_host

    host = get_host()
    started = time.perf_counter()
    # --force: the exporter's atomic_dir swaps the new folder in once it is complete; until then
    # the old export keeps its name (and its record in exports.json).
    with console.status(f"exporting {label} to {out_dir} ..."), host.guard(plugin, f"exporting {exporter.name}"), \
            (replacing(out_dir) if overwrite else contextlib.nullcontext()):
        result = exporter.export(run, out_dir, quant, **options)
    if not isinstance(result, ExportResult):
        raise QtuneError(f"{host.plugin_label(plugin)} returned {type(result).__name__} from export(); "
                         f"it must return a qtune.api.ExportResult")
    if not Path(result.path).exists():
        raise QtuneError(f"{host.plugin_label(plugin)} reported {str(result.path)!r} from export(), which does not exist; "
                         f"fix the plugin")
    if not result.files:
        result.files = sorted(p for p in Path(result.path).rglob("*") if p.is_file()) if Path(result.path).is_dir() else [Path(result.path)]
    result.details.setdefault("quant", quant)
    result.details["seconds"] = round(time.perf_counter() - started, 2)
    result.details["bytes"] = sum(p.stat().st_size for p in result.files if p.is_file())
    console.print(f"exported [bold]{label}[/] to {result.path} ({_size(result.details['bytes'])}, {result.details['seconds']:.1f} s)")
    for note in result.details.get("notes") or []:
        console.print(f"[yellow]note:[/] {note}")

    report = None
    if verify:
        if _supports_verify(exporter):
            with console.status(f"verifying {label} ..."), host.guard(plugin, f"verifying {exporter.name}"):
                report = exporter.verify(run, result)
            if not isinstance(report, VerifyReport):
                raise QtuneError(f"{host.plugin_label(plugin)} returned {type(report).__name__} from verify(); it must return "
                                 f"a qtune.api.VerifyReport (or leave verify out); the export is in {str(result.path)!r}")
            console.print(report.table())
            result.details["verify"] = report.to_dict()
        else:
            result.details["verify"] = None
            console.print(f"[dim]format {exporter.name!r} has no verification; skipped[/]")
    record_export(run, result)
    if report is not None:
        report.raise_if_failed(result.path)
    return result


def result_record(result: ExportResult) -> dict[str, Any]:
    base = Path(result.path)
    return {
        "format": result.format,
        "path": str(base),
        "files": [str(p.relative_to(base)) if base.is_dir() and p.is_relative_to(base) else str(p) for p in result.files],
        **result.details,
    }


def record_export(run: FinishedRun, result: ExportResult) -> None:
    """Add ``result`` to RUN_DIR/exports/exports.json and to summary.json's ``exports``, keyed by folder."""
    key = Path(result.path).name
    record = json.loads(json.dumps(result_record(result), default=str))
    record_file = run.exports_dir / EXPORTS_RECORD
    records = existing_records(read_json_dict(record_file))
    records[key] = record
    with atomic_file(record_file) as handle:
        json.dump(records, handle, indent=2)
    summary_file = run.run_dir / "summary.json"
    if summary_file.is_file():
        summary = read_json_dict(summary_file)
        exports = summary.get("exports")
        exports = existing_records(exports if isinstance(exports, dict) else {})
        exports[key] = record
        summary["exports"] = exports
        with atomic_file(summary_file) as handle:
            json.dump(summary, handle, indent=2, default=str)


def existing_records(records: dict[str, Any]) -> dict[str, Any]:
    """The export records whose folder (or file) still exists: exports.json never names a missing one."""
    return {key: record for key, record in records.items()
            if not isinstance(record, dict) or not record.get("path") or Path(record["path"]).exists()}


def run_exports(run: FinishedRun, entries: Iterable[ExportEntry], console: Any = None) -> dict[str, Any]:
    """The config's ``exports:`` list, in order; returns ``{folder name: record}`` for the summary.

    Each entry is checked (format, quantization) before the first export starts. A failed export
    (including failed verification) stops the list with its QtuneError.
    """
    entries = list(entries)
    plan = []
    for index, entry in enumerate(entries):
        try:
            exporter = get_exporter(entry.format)
            plan.append((exporter, exporter.resolve_quantization(entry.quant), entry.verify))
        except QtuneError as error:
            raise QtuneError(f"exports[{index}]: {error}") from None
    records: dict[str, Any] = {}
    for exporter, quant, verify in plan:
        result = export_run(run, exporter.name, quant, verify, console=console)
        records[Path(result.path).name] = result_record(result)
    return json.loads(json.dumps(records, default=str))


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"
