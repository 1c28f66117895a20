"""``mm1 data``: training data from corpora on disk.

    mm1 data shards coco captions_train2017.json --images train2017/ --output shards/coco
    mm1 data shards llava blip_laion_cc_sbu_558k.json --images llava_pretrain/images \\
        --output shards/llava
    mm1 data shards conversations llava_v1_5_mix665k.json --images llava_sft/ \\
        --output shards/sft              # multi-turn conversations, for SFT
    mm1 data shards preferences rlaif_v.json --images rlaif_v/ \\
        --output shards/dpo              # prompt + chosen / rejected answers, for DPO
    mm1 data shards videos llava_video_qa.json --videos videos/ --num-frames 8 \\
        --output shards/video            # video QA: conversations over sampled frames
    mm1 data shards interleaved docs-*.jsonl --images doc_images/ \\
        [--url-map downloaded.tsv] --output shards/docs
    mm1 data shards index shards/laion/*.tar --kind caption \\
        --output shards/laion/manifest.json   # a manifest for shards made by another tool
    mm1 data shards energon-meta shards/coco   # .nv-meta for energon
    mm1 data tokenizer corpus.jsonl captions.txt --vocab-size 32000 \\
        --output tok/mm1                 # tok/mm1.model and tok/mm1.vocab
    mm1 data text-index corpus-*.jsonl --tokenizer sentencepiece \\
        --tokenizer-path tok/mm1.model --output data/text/corpus   # .bin / .idx

The inputs are the positional arguments (several files where a command reads several, so
a shell glob works); ``--output`` is what the command writes. Rerun the same command after
an interruption to resume; see docs/data.md for the formats.
Exit code 0 on success, 2 for a bad input (the message names it).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Optional

from mm1_megatron.cli.flags import add_output, check_output
from mm1_megatron.data.shards.reader import SHARD_KINDS
from mm1_megatron.data.tokenizers.text import TOKENIZER_KINDS
from mm1_megatron.utils.logging_setup import setup_logging

logger = logging.getLogger("mm1_megatron.data.cli")

SHARDS_HELP = """Every build also writes Megatron-Energon's ``.nv-meta`` sidecar next to the
manifest (``--no-energon-meta`` skips it), so energon's loader opens the shards as well."""

TOKENIZER_HELP = """Inputs: ``.jsonl`` (the ``--text-key`` field of each line, or the text
segments of an interleaved document) and plain-text files (one sentence per line). Special
ids: pad 0, unk 1, bos 2, eos 3, ``<image>`` 4. Use it with
``data.tokenizer.kind=sentencepiece data.tokenizer.path=tok/mm1.model``."""

TEXT_INDEX_HELP = """Each line's text becomes one document, ``<bos> text <eos>``.
``<output>.meta.json`` records the tokenizer, so training refuses a corpus tokenized with
another one."""


def _build_options(parser: argparse.ArgumentParser) -> None:
    add_output(
        parser,
        "output folder (shards + manifest.json)",
        required=True,
        metavar="FOLDER",
        deprecated=("--out",),
    )
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument(
        "--verify-images", action="store_true", help="decode every image once and skip corrupt ones"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--no-energon-meta", action="store_true", help="do not write the .nv-meta sidecar"
    )


def _add_shards(commands) -> None:
    shards = commands.add_parser(
        "shards",
        help="caption, interleaved, conversation or preference tar shards and their manifest",
        description=SHARDS_HELP,
    )
    sub = shards.add_subparsers(dest="layout", required=True, metavar="<layout>")
    coco = sub.add_parser("coco", help="COCO captions JSON + image folder")
    coco.add_argument("captions", metavar="CAPTIONS_JSON", help="captions_*.json")
    coco.add_argument("--images", required=True, help="image folder")
    coco.add_argument(
        "--all-captions",
        action="store_true",
        help="one sample per caption (default: per image, its first caption)",
    )
    _build_options(coco)
    llava = sub.add_parser("llava", help="LLaVA-pretrain JSON + image folder")
    llava.add_argument("input", metavar="JSON", help="the LLaVA JSON file")
    llava.add_argument("--images", required=True, help="image folder")
    _build_options(llava)
    conv = sub.add_parser("conversations", help="LLaVA instruction JSON + image folder")
    conv.add_argument("input", metavar="JSON", help="the LLaVA instruction JSON file")
    conv.add_argument("--images", default=".", help="folder the entries' image paths are in")
    _build_options(conv)
    video = sub.add_parser(
        "videos",
        help="LLaVA-Video JSON + video folder: conversations over sampled frames (needs av)",
    )
    video.add_argument("input", metavar="JSON", help="the LLaVA-Video JSON file")
    video.add_argument("--videos", default=".", help="folder the records' video paths are in")
    video.add_argument("--num-frames", type=int, default=8, help="frames per video (default 8)")
    video.add_argument(
        "--fps",
        type=float,
        default=None,
        help="take frames at this rate, thinned to --num-frames (default: equal spans)",
    )
    _build_options(video)
    pref = sub.add_parser(
        "preferences", help="preference JSON (LLaVA prompt + chosen / rejected) + images"
    )
    pref.add_argument("input", metavar="JSON", help="the preference JSON file")
    pref.add_argument("--images", default=".", help="folder the entries' image paths are in")
    _build_options(pref)
    inter = sub.add_parser("interleaved", help="interleaved documents as JSONL + images")
    inter.add_argument("input", nargs="+", metavar="JSONL", help="JSONL files")
    inter.add_argument("--images", default=".", help="folder for relative image paths")
    inter.add_argument("--url-map", help="TSV of 'url<TAB>downloaded file' for image URLs")
    _build_options(inter)
    index = sub.add_parser("index", help="write a manifest for existing plain-tar shards")
    index.add_argument("--kind", choices=SHARD_KINDS, required=True)
    add_output(
        index, "manifest path (or its folder)", required=True, metavar="PATH", deprecated=("--out",)
    )
    index.add_argument("shards", nargs="+", metavar="SHARD", help="the .tar shards")
    meta = sub.add_parser("energon-meta", help="write .nv-meta for a folder of our shards")
    meta.add_argument("folder", help="folder holding manifest.json and its shards")


def _add_text_index(commands) -> None:
    text = commands.add_parser(
        "text-index",
        help="tokenize JSONL text into a Megatron-Core indexed dataset (.bin / .idx)",
        description=TEXT_INDEX_HELP,
    )
    text.add_argument("input", nargs="+", metavar="JSONL", help="JSONL files")
    text.add_argument("--text-key", default="text")
    text.add_argument("--tokenizer", choices=TOKENIZER_KINDS, default="sentencepiece")
    text.add_argument("--tokenizer-path")
    add_output(
        text,
        "<PREFIX>.bin, .idx and .meta.json",
        required=True,
        metavar="PREFIX",
        deprecated=("--out",),
    )
    text.add_argument("--docs-per-part", type=int, default=100_000)
    text.add_argument("--no-progress", action="store_true")


def _add_tokenizer(commands) -> None:
    tok = commands.add_parser(
        "tokenizer",
        help="train a sentencepiece tokenizer with the image special token",
        description=TOKENIZER_HELP,
    )
    tok.add_argument("input", nargs="+", metavar="FILE", help=".jsonl or plain-text files")
    tok.add_argument("--text-key", default="text")
    add_output(
        tok, "<PREFIX>.model and .vocab", required=True, metavar="PREFIX", deprecated=("--out",)
    )
    tok.add_argument("--vocab-size", type=int, default=32000)
    tok.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    tok.add_argument(
        "--max-sentences", type=int, default=10_000_000, help="train on at most this many lines"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mm1 data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    _add_shards(commands)
    _add_text_index(commands)
    _add_tokenizer(commands)
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return check_output(build_parser().parse_args(argv))


def _shards(args: argparse.Namespace) -> int:
    from mm1_megatron.data.shards.energon_meta import write_energon_meta
    from mm1_megatron.data.shards.ingest import (
        coco_items,
        interleaved_items,
        llava_conversation_items,
        llava_items,
    )
    from mm1_megatron.data.shards.reader import index_existing_shards
    from mm1_megatron.data.shards.writer import build_shards, inputs_id

    if args.layout == "index":
        logger.info("wrote %s", index_existing_shards(args.shards, args.output, args.kind))
        return 0
    if args.layout == "energon-meta":
        logger.info("wrote %s", write_energon_meta(args.folder))
        return 0
    if args.layout == "coco":
        items = coco_items(args.captions, args.images, all_captions=args.all_captions)
        kind, source = "caption", ("coco", args.captions, args.images, args.all_captions)
    elif args.layout == "llava":
        items, kind = llava_items(args.input, args.images), "caption"
        source = ("llava", args.input, args.images)
    elif args.layout == "conversations":
        items, kind = llava_conversation_items(args.input, args.images), "conversation"
        source = ("conversations", args.input, args.images)
    elif args.layout == "videos":
        from mm1_megatron.data.shards.video_records import video_conversation_items

        items = video_conversation_items(
            args.input, args.videos, num_frames=args.num_frames, fps=args.fps
        )
        kind = "conversation"
        source = ("videos", args.input, args.videos, args.num_frames, args.fps)
    elif args.layout == "preferences":
        items, kind = llava_conversation_items(args.input, args.images), "preference"
        source = ("preferences", args.input, args.images)
    else:
        from mm1_megatron.data.shards.ingest import load_url_map

        items = interleaved_items(args.input, args.images, url_map=load_url_map(args.url_map))
        kind, source = "interleaved", ("interleaved", args.input, args.images, args.url_map)
    counts = build_shards(
        items,
        args.output,
        kind=kind,
        samples_per_shard=args.samples_per_shard,
        input_id=inputs_id(*source, args.samples_per_shard, args.verify_images),
        verify_images=args.verify_images,
        progress=not args.no_progress,
    )
    if not args.no_energon_meta:
        write_energon_meta(args.output)
    logger.info("done: %s", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


def _text_index(args: argparse.Namespace) -> int:
    from mm1_megatron.data.shards.ingest import jsonl_texts
    from mm1_megatron.data.shards.text_index import build_text_index
    from mm1_megatron.data.tokenizers.text import build_tokenizer

    tokenizer = build_tokenizer(args.tokenizer, args.tokenizer_path)
    skipped: Counter = Counter()
    counts = build_text_index(
        jsonl_texts(args.input, args.text_key, skipped),
        args.output,
        tokenizer,
        docs_per_part=args.docs_per_part,
        progress=not args.no_progress,
    )
    logger.info(
        "wrote %s.bin/.idx: %d documents, %d tokens; skipped lines: %s",
        args.output,
        counts["documents"],
        counts["tokens"],
        dict(skipped) or "none",
    )
    return 0


def _texts(paths: List[str], text_key: str):
    from mm1_megatron.data.shards.ingest import jsonl_texts

    for path in paths:
        if path.endswith(".jsonl"):
            yield from jsonl_texts([path], text_key)
        else:
            with open(path, encoding="utf-8", errors="replace") as file:
                yield from (line.rstrip("\n") for line in file)


def _tokenizer(args: argparse.Namespace) -> int:
    from mm1_megatron.data.tokenizers.text import SentencePieceTokenizer, train_sentencepiece

    texts = itertools.islice(_texts(args.input, args.text_key), args.max_sentences)
    try:
        model = train_sentencepiece(
            texts, args.output, vocab_size=args.vocab_size, model_type=args.model_type
        )
    except RuntimeError as exc:  # sentencepiece refuses the corpus or the settings
        raise ValueError(str(exc)) from exc
    tokenizer = SentencePieceTokenizer(model)
    logger.info(
        "wrote %s: %d tokens (pad %d, bos %d, eos %d, image %d)",
        Path(model),
        tokenizer.vocab_size,
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.image_token_id,
    )
    return 0


COMMANDS: Dict[str, Callable[[argparse.Namespace], int]] = {
    "shards": _shards,
    "text-index": _text_index,
    "tokenizer": _tokenizer,
}


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        return COMMANDS[args.command](args)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
