"""`fastslm-convert`: published FastSLM files -> the project's model folder.

    fastslm-convert --checkpoint Stage3_FastSLM.pt --qwen Qwen3-4B/ --out fastslm-4b/
    fastslm-convert --checkpoint hfq_former_lora.pt --whisper large-v3.pt --qwen Qwen3-4B/ --out fastslm-4b/
    fastslm-convert --random-init published --out fastslm-4b-random/ [--llm-layers 2 --encoder-layers 2]
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
    out: Annotated[Path, typer.Option(help="Model folder to write.")],
    checkpoint: Annotated[Optional[Path], typer.Option(help="Published FastSLM state dict (.pt), full or HFQ-Former + LoRA only.")] = None,
    qwen: Annotated[Optional[Path], typer.Option(help="Qwen3-4B folder: config.json, tokenizer.json (+ safetensors if needed).")] = None,
    whisper: Annotated[Optional[Path], typer.Option(help="Whisper large-v3 (.pt or HF folder) for checkpoints without Whisper weights.")] = None,
    lora_alpha: Annotated[float, typer.Option(help="LoRA alpha used in training.")] = 64.0,
    lora_r: Annotated[int, typer.Option(help="LoRA rank used in training.")] = 16,
    dtype: Annotated[str, typer.Option(help="Stored weight precision: float32, float16 or bfloat16.")] = "float16",
    force: Annotated[bool, typer.Option(help="Replace a non-empty --out folder.")] = False,
    random_init: Annotated[Optional[str], typer.Option(help="Instead of a checkpoint: random weights at these shapes ('published').", rich_help_panel="Random weights")] = None,
    llm_layers: Annotated[Optional[int], typer.Option(help="--random-init: LLM layers (default: the preset's).", rich_help_panel="Random weights")] = None,
    encoder_layers: Annotated[Optional[int], typer.Option(help="--random-init: Whisper encoder layers (default: the preset's).", rich_help_panel="Random weights")] = None,
    seed: Annotated[int, typer.Option(help="--random-init: seed of every tensor's generator.", rich_help_panel="Random weights")] = 0,
) -> None:
    with reported_in_one_line("fastslm-convert", "interrupted; nothing was written"):
        if dtype not in DTYPES:
            raise OptionError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if random_init is not None:
            if checkpoint is not None or qwen is not None or whisper is not None:
                raise OptionError("--random-init makes weights itself: leave out --checkpoint, --qwen and --whisper")
            _write_random(out, random_init, llm_layers, encoder_layers, seed, dtype, force)
            return
        if llm_layers is not None or encoder_layers is not None:
            raise OptionError("--llm-layers and --encoder-layers apply to --random-init only")
        if checkpoint is None or qwen is None:
            raise OptionError("pass --checkpoint and --qwen (the published files), or --random-init published")
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


def _write_random(out: Path, preset: str, llm_layers: int | None, encoder_layers: int | None, seed: int,
                  dtype: str, force: bool) -> None:  # fmt: skip
    import sys

    from tqdm import tqdm

    from .random_init import PRESETS, published_config, weight_bytes, write_random_model

    if preset not in PRESETS:
        raise OptionError(f"--random-init {preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    for flag, n in (("--llm-layers", llm_layers), ("--encoder-layers", encoder_layers)):
        if n is not None and not 1 <= n <= 64:
            raise OptionError(f"{flag} must be between 1 and 64, got {n}")
    import torch

    config = published_config(llm_layers, encoder_layers)
    torch_dtype = getattr(torch, dtype)
    with OutputFolder(out, force) as output:
        with tqdm(total=weight_bytes(config, torch_dtype), unit="B", unit_scale=True, desc="random weights",
                  file=sys.stderr, disable=None) as bar:  # fmt: skip
            total = write_random_model(output.path, config, seed=seed, dtype=torch_dtype, progress=bar.update)
        output.publish()
    typer.echo(f"fastslm-convert: wrote {out} ({config.description}; {total / 1e9:.2f} GB of "
               f"{dtype} weights, seed {seed})")  # fmt: skip


def main() -> None:
    run_cli(app, "fastslm-convert")
