"""`fastslm-convert`: published FastSLM files -> the project's model folder.

    fastslm-convert --checkpoint Stage3_FastSLM.pt --qwen Qwen3-4B/ --out fastslm-4b/
    fastslm-convert --checkpoint adapter_lora.pt --whisper large-v3.pt --qwen Qwen3-4B/ --out fastslm-4b/
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..runtime.bundle import TOKENIZER_FILE
from ..runtime.errors import OptionError, reported_in_one_line, run_cli
from ..runtime.output_folder import OutputFolder

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

DTYPES = ("float32", "float16", "bfloat16")


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
    with reported_in_one_line("fastslm-convert", "interrupted; nothing was written"):
        if dtype not in DTYPES:
            raise OptionError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if lora_r < 1 or lora_alpha <= 0:
            raise OptionError("--lora-r must be >= 1 and --lora-alpha > 0")
        import torch

        from .checkpoint import LoRASettings, fastslm_tokenizer, load_reference_checkpoint

        with OutputFolder(out, force, protect=[p for p in (checkpoint, qwen, whisper) if p is not None]) as output:
            tokenizer = fastslm_tokenizer(qwen)
            model = load_reference_checkpoint(checkpoint, qwen, whisper, LoRASettings(lora_alpha, lora_r))
            model = model.to(getattr(torch, dtype))
            tokenizer.save(str(output.path / TOKENIZER_FILE))
            model.save_pretrained(output.path)
            output.publish()
        typer.echo(f"fastslm-convert: wrote {out} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {dtype})")


def main() -> None:
    run_cli(app, "fastslm-convert")
