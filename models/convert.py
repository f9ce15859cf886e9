"""`fastslm-convert`: published FastSLM files -> the project's model folder.

    fastslm-convert --checkpoint Stage3_FastSLM.pt --qwen Qwen3-4B/ --out fastslm-4b/
    fastslm-convert --checkpoint adapter_lora.pt --whisper large-v3.pt --qwen Qwen3-4B/ --out fastslm-4b/
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..runtime.errors import FastSLMError, OptionError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

DTYPES = ("float32", "float16", "bfloat16")


def prepare_output_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OptionError(f"--out {out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OptionError(f"--out {out} exists and is not empty; pass --force to replace it")


def publish_dir(staging: Path, out: Path) -> None:
    """Move a finished folder into place so a crash never leaves a half-written model."""
    if out.exists():
        backup = out.with_name(out.name + ".old")
        shutil.rmtree(backup, ignore_errors=True)
        out.rename(backup)
        staging.rename(out)
        shutil.rmtree(backup)
    else:
        staging.rename(out)


@app.command()
def convert(
    checkpoint: Annotated[Path, typer.Option(help="Published FastSLM state dict (.pt), full or adapter+LoRA only.")],
    qwen: Annotated[Path, typer.Option(help="Qwen3-4B folder: config.json, tokenizer.json (+ safetensors if needed).")],
    out: Annotated[Path, typer.Option(help="Model folder to write.")],
    whisper: Annotated[Optional[Path], typer.Option(help="Whisper large-v3 (.pt or HF folder) for adapter-only checkpoints.")] = None,
    lora_alpha: Annotated[float, typer.Option(help="LoRA alpha used in training.")] = 64.0,
    lora_r: Annotated[int, typer.Option(help="LoRA rank used in training.")] = 16,
    dtype: Annotated[str, typer.Option(help="Stored weight precision: float32, float16 or bfloat16.")] = "float16",
    force: Annotated[bool, typer.Option(help="Replace a non-empty --out folder.")] = False,
) -> None:
    try:
        import torch

        from .checkpoint import LoRASettings, fastslm_tokenizer, load_reference_checkpoint

        if dtype not in DTYPES:
            raise OptionError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if lora_r < 1 or lora_alpha <= 0:
            raise OptionError("--lora-r must be >= 1 and --lora-alpha > 0")
        out = out.resolve()
        prepare_output_dir(out, force)
        tokenizer = fastslm_tokenizer(qwen)
        model = load_reference_checkpoint(checkpoint, qwen, whisper, LoRASettings(lora_alpha, lora_r))
        model = model.to(getattr(torch, dtype))
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            tokenizer.save(str(staging / "tokenizer.json"))
            model.save_pretrained(staging)
            publish_dir(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        typer.echo(f"fastslm-convert: wrote {out} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {dtype})")
    except FastSLMError as exc:
        typer.echo(f"fastslm-convert: error: {exc}", err=True)
        raise typer.Exit(exc.exit_code)


def main() -> None:
    app()
