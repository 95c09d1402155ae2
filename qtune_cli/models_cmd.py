"""`qtune models`: the catalogue of short model names."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table


def _rows(family: str | None) -> list[dict]:
    from qtune.plugin_manager import get_host

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
    rows.sort(key=lambda r: (r["family"], r["params_b"], r["name"]))
    return rows


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print the catalogue as JSON.")
@click.option("--family", default=None, help="Only models of this family (qwen2, llama, mistral, phi3, gemma2).")
def models(as_json: bool, family: str | None) -> None:
    """List the catalogue's short model names (use one as model.name).

    4-bit memory is an estimate of the GPU memory a QLoRA run needs at the seed's settings
    (LoRA r16, 2 x 2048-token micro-batches, Unsloth's gradient checkpointing).
    """
    rows = _rows(family)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="qtune models", title_justify="left")
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("hub id", overflow="fold")
    table.add_column("family")
    table.add_column("params", justify="right")
    table.add_column("4-bit memory", justify="right")
    for row in rows:
        params = f"{row['params_b']:g}B" if row["params_b"] else "-"
        memory = f"{row['memory_4bit_gib']:.1f} GiB" if row["memory_4bit_gib"] is not None else "-"
        table.add_row(row["name"], row["source"], row["family"], params, memory)
    console = Console()
    console.print(table)
    if not rows:
        console.print(f"no model of family {family!r}")
