"""`qtune models`: the catalogue of short model names."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table


def _rows(family: str | None, gpus_of: float | None = None) -> list[dict]:
    from qtune.plugin_manager import get_host

    if gpus_of is not None:
        from qtune.config import seed_config
        from qtune.distributed import gpus_needed

        seed = seed_config()

    host = get_host()
    rows = []
    for name in host.models:
        entry = host.models.items[name]
        if family and entry.family.lower() != family.lower():
            continue
        rows.append(
            {
                "name": entry.name,
                "source": entry.source or "(built locally)",
                "family": entry.family,
                "params_b": entry.params_b,
                "memory_4bit_gib": entry.memory_4bit_gib,
                "description": entry.description,
                "plugin": host.models.owners[name],
            }
        )
        if gpus_of is not None:
            shape = getattr(entry, "shape", None)
            needed = gpus_needed(shape, seed, gpus_of) if shape is not None else None
            rows[-1]["gpus"], rows[-1]["strategy"] = needed if needed else (None, None)
    rows.sort(key=lambda r: (r["family"], r["params_b"], r["name"]))
    return rows


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print the catalogue as JSON.")
@click.option("--family", default=None, help="Only models of this family (qwen2, llama, mistral, phi3, gemma2).")
@click.option("--gpus-of", "gpus_of", type=click.FloatRange(min=1, min_open=False), default=None, metavar="GIB",
              help="Add the fewest GPUs of GIB GiB each model needs at the seed's settings (- when no number up to 64 "
                   "does), and the strategy (single or fsdp).")
def models(as_json: bool, family: str | None, gpus_of: float | None) -> None:
    """List the catalogue's short model names (use one as model.name).

    4-bit memory is an estimate of the GPU memory a QLoRA run needs at the seed's settings
    (LoRA r16, 2 x 2048-token micro-batches, Unsloth's gradient checkpointing). With --gpus-of,
    the GPUs of that size it needs: one when it fits, else the fewest that hold it sharded with FSDP
    (qtune.profiles.sharded_memory_gib; more GPUs than that can still train it faster with ddp
    when it fits one).
    """
    rows = _rows(family, gpus_of)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="qtune models", title_justify="left")
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("hub id", overflow="fold")
    table.add_column("family")
    table.add_column("params", justify="right")
    table.add_column("4-bit memory", justify="right")
    if gpus_of is not None:
        table.add_column(f"{gpus_of:g} GiB GPUs", justify="right")
        table.add_column("strategy")
    for row in rows:
        params = f"{row['params_b']:g}B" if row["params_b"] else "-"
        memory = f"{row['memory_4bit_gib']:.1f} GiB" if row["memory_4bit_gib"] is not None else "-"
        cells = [row["name"], row["source"], row["family"], params, memory]
        if gpus_of is not None:
            cells += [str(row["gpus"]) if row["gpus"] else "-", row["strategy"] or "-"]
        table.add_row(*cells)
    console = Console()
    console.print(table)
    if not rows:
        console.print(f"no model of family {family!r}")
