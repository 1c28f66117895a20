"""``mm1 convert``: Hugging Face <-> mm1_megatron checkpoints.

    mm1 convert import --language-model hf/llama-3b --vision-encoder hf/dfn5b-vit-h \\
        --config configs/mm1_3b.yaml --output ckpts/mm1_3b_init
    mm1 convert export --checkpoint runs/mm1_3b/checkpoints --output exports/mm1_3b
    mm1 convert export --checkpoint runs/x/ckpt --format llava --output exports/x_llava

Exit code 0 on success, 2 for a bad input (unsupported architecture, mismatched shapes,
a damaged file, an output that would overwrite an input, a folder that cannot be
written, ...) with the reason on stderr. See docs/conversion.md.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import List, Optional

from mm1_megatron.cli.flags import add_config
from mm1_megatron.utils.logging_setup import setup_logging

logger = logging.getLogger("mm1_megatron.convert")

EXIT_BAD_INPUT = 2
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?B)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3}
OVERWRITE_HELP = (
    "replace an earlier mm1 convert output in --output (only what it wrote; a folder "
    "with other files is refused)"
)


def parse_size(text: str) -> int:
    """``5GB`` / ``500MB`` / ``123`` (bytes) -> bytes."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB or 500MB")
    unit = match.group(2).upper() if match.group(2) else None
    return int(float(match.group(1)) * _UNITS[unit])


def _add_import_parser(commands) -> None:
    p = commands.add_parser("import", help="Hugging Face weights -> an mm1_megatron checkpoint")
    p.add_argument(
        "--language-model",
        type=Path,
        help="Llama / Mistral / Qwen2 / Qwen3 / Mixtral / Qwen2-MoE / Qwen3-MoE "
        "*ForCausalLM folder (safetensors)",
    )
    p.add_argument(
        "--vision-encoder",
        type=Path,
        help="CLIP / SigLIP / SigLIP 2 vision model, or the vision half of the full model "
        "(safetensors)",
    )
    p.add_argument("--output", type=Path, required=True, help="save folder to create")
    add_config(
        p, "YAML for everything not imported (connector, training); default: the schema defaults"
    )
    p.add_argument(
        "--tokenizer",
        type=Path,
        help="Hugging Face tokenizer folder (default: the language model folder "
        "when it has tokenizer files)",
    )
    p.add_argument("--vocab-size", type=int, help="grow the vocabulary to this many rows")
    p.add_argument(
        "--vocab-multiple",
        type=int,
        default=1,
        help="round the vocabulary up to a multiple (e.g. 128 x TP)",
    )
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument(
        "overrides", nargs="*", metavar="section.field=value", help="dotted overrides of --config"
    )


def _add_export_parser(commands) -> None:
    from mm1_megatron.conversion.exporter import FORMATS

    p = commands.add_parser("export", help="an mm1_megatron checkpoint -> a Hugging Face folder")
    p.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="save folder (its latest checkpoint) or one step folder, any layout",
    )
    p.add_argument("--output", type=Path, required=True, help="folder to create")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="auto: mm1 for a full model, else the part the checkpoint holds",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        help="float32, bfloat16 or float16 (auto: the imported source's, else float32)",
    )
    p.add_argument(
        "--tokenizer", type=Path, help="Hugging Face tokenizer folder replacing the checkpoint's"
    )
    p.add_argument(
        "--max-shard-size",
        type=parse_size,
        default="5GB",
        help="largest safetensors shard (default 5GB)",
    )
    p.add_argument(
        "--base",
        type=Path,
        help="a LoRA checkpoint's base model, where it has moved (default: the recorded one)",
    )
    p.add_argument(
        "--adapter",
        action="store_true",
        help="a LoRA checkpoint's adapters as a PEFT adapter folder (default: merged model)",
    )
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mm1 convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_import_parser(commands)
    _add_export_parser(commands)
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _run_import(args) -> None:
    from mm1_megatron.conversion.importer import ImportRequest, import_checkpoint

    import_checkpoint(
        ImportRequest(
            output=args.output,
            language_model=args.language_model,
            vision_encoder=args.vision_encoder,
            base_config=args.config or None,
            overrides=args.overrides,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            vocab_multiple=args.vocab_multiple,
            overwrite=args.overwrite,
            seed=args.seed,
        )
    )


def _run_export(args) -> None:
    from mm1_megatron.conversion.exporter import ExportRequest, export_checkpoint

    export_checkpoint(
        ExportRequest(
            checkpoint=args.checkpoint,
            output=args.output,
            format=args.format,
            dtype=args.dtype,
            tokenizer=args.tokenizer,
            overwrite=args.overwrite,
            max_shard_bytes=args.max_shard_size,
            base=args.base,
            adapter=args.adapter,
        )
    )


def main(argv: Optional[List[str]] = None) -> int:
    setup_logging()  # before parsing: the parser imports Megatron-Core, which warns
    args = parse_args(argv)
    try:
        (_run_import if args.command == "import" else _run_export)(args)
    except ValueError as exc:  # ConversionError and config errors: the user's input
        logger.error("%s", exc)
        return EXIT_BAD_INPUT
    except OSError as exc:  # a file that cannot be read or written: the user's to fix
        where = f": {exc.filename}" if exc.filename else ""
        logger.error("%s%s", exc.strerror or exc, where)
        return EXIT_BAD_INPUT
    logger.info("done: %s", args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
