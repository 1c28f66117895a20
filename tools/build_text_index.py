#!/usr/bin/env python
"""Tokenize plain-text JSONL into a Megatron-Core indexed dataset (<out>.bin / .idx).

    python tools/build_text_index.py --input corpus-*.jsonl --text-key text \
        --tokenizer sentencepiece --tokenizer-path tok/mm1.model --out data/text/corpus

Each line's text becomes one document, ``<bos> text <eos>``. Rerun the same command after
an interruption to resume at the first unfinished part; ``<out>.meta.json`` records the
tokenizer so training refuses a corpus tokenized with another one.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter

from mm1_megatron.data.shards.ingest import jsonl_texts
from mm1_megatron.data.shards.text_index import build_text_index
from mm1_megatron.data.tokenizers.text import TOKENIZER_KINDS, build_tokenizer
from mm1_megatron.utils.logging_setup import setup_logging

logger = logging.getLogger("build_text_index")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", nargs="+", required=True, help="JSONL files")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--tokenizer", choices=TOKENIZER_KINDS, default="sentencepiece")
    parser.add_argument("--tokenizer-path")
    parser.add_argument("--out", required=True, help="output prefix")
    parser.add_argument("--docs-per-part", type=int, default=100_000)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        tokenizer = build_tokenizer(args.tokenizer, args.tokenizer_path)
        skipped: Counter = Counter()
        counts = build_text_index(
            jsonl_texts(args.input, args.text_key, skipped),
            args.out,
            tokenizer,
            docs_per_part=args.docs_per_part,
            progress=not args.no_progress,
        )
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    logger.info(
        "wrote %s.bin/.idx: %d documents, %d tokens; skipped lines: %s",
        args.out,
        counts["documents"],
        counts["tokens"],
        dict(skipped) or "none",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
