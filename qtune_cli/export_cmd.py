"""`qtune export RUN_DIR --format F`: write a finished run in another format and check it.

Only click is imported here; the export machinery (torch, transformers, llama.cpp) loads when the
command runs.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "-f", "fmt", required=True, metavar="FORMAT",
              help="lora, merged-16bit, merged-4bit, gguf, or a plugin's format (`qtune plugins` lists them).")
@click.option("--quant", "-q", default=None, metavar="QUANT",
              help="merged-16bit: bf16 (default), fp16, fp32; gguf: q8_0 (default), f16, bf16, q6_k, q5_k_m, q4_k_m, ...")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Load the result in its runtime and compare its logits with the trained model; fail below the format's bound.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default RUN_DIR/exports/FORMAT-QUANT).")
@click.option("--llama-cpp-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="gguf: use this llama.cpp checkout's converter instead of the installed llama-cpp-python's "
                   "(or set QTUNE_LLAMA_CPP_DIR).")
@click.option("--max-shard-size", default=None, metavar="SIZE", help="merged-16bit: largest safetensors shard, e.g. 5GB (default) or 500MB.")
@click.option("--option", "extra", multiple=True, metavar="NAME=VALUE",
              help="An option the format declares in its Exporter.options (a plugin's README names them); repeatable.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists (the old one stays until the new one is complete).")
def export(run_dir: Path, fmt: str, quant: str | None, verify: bool, out: Path | None, llama_cpp_dir: Path | None,
           max_shard_size: str | None, extra: tuple[str, ...], force: bool):
    """Export the run in RUN_DIR as FORMAT.

    \b
    qtune export runs/NAME -f lora
    qtune export runs/NAME -f merged-16bit --max-shard-size 2GB
    qtune export runs/NAME -f merged-4bit
    qtune export runs/NAME -f gguf -q q4_k_m     (also writes an Ollama Modelfile)
    """
    from rich.console import Console

    from qtune.errors import QtuneError
    from qtune.export import export_run
    from qtune.run import FinishedRun
    from qtune_cli.output import quiet_libraries

    quiet_libraries()  # the libraries' loading bars and hub-kernel warnings would bury the report
    console = Console(stderr=True, highlight=False)
    run = FinishedRun.open(run_dir)
    options = {"llama_cpp_dir": llama_cpp_dir, "max_shard_size": max_shard_size}
    for item in extra:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise QtuneError(f"--option {item!r} is not NAME=VALUE; write it like --option max_shard_size=2GB")
        options[name.strip().replace("-", "_")] = value
    result = export_run(run, fmt, quant, verify, out, console, overwrite=force, **options)
    click.echo(str(result.path))
