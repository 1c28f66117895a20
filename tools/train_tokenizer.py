#!/usr/bin/env python
"""Train a sentencepiece tokenizer with the image special token on a text corpus.

    python tools/train_tokenizer.py --input corpus.jsonl captions.txt --vocab-size 32000 \
        --out tok/mm1          # writes tok/mm1.model and tok/mm1.vocab

Inputs: ``.jsonl`` (the ``--text-key`` field of each line, or the text segments of an
interleaved document) and plain-text files (one sentence per line). Special ids: pad 0,
unk 1, bos 2, eos 3, ``<image>`` 4. Use it with ``data.tokenizer.kind=sentencepiece
data.tokenizer.path=tok/mm1.model``.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from pathlib import Path

from mm1_megatron.data.shards.ingest import jsonl_texts
from mm1_megatron.data.tokenizers.text import SentencePieceTokenizer, train_sentencepiece
from mm1_megatron.utils.logging_setup import setup_logging

logger = logging.getLogger("train_tokenizer")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", nargs="+", required=True)
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--out", required=True, help="model prefix")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument(
        "--max-sentences", type=int, default=10_000_000, help="train on at most this many lines"
    )
    return parser.parse_args(argv)


def _texts(paths, text_key):
    for path in paths:
        if path.endswith(".jsonl"):
            yield from jsonl_texts([path], text_key)
        else:
            with open(path, encoding="utf-8", errors="replace") as file:
                yield from (line.rstrip("\n") for line in file)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        texts = itertools.islice(_texts(args.input, args.text_key), args.max_sentences)
        model = train_sentencepiece(
            texts, args.out, vocab_size=args.vocab_size, model_type=args.model_type
        )
    except (ValueError, RuntimeError) as exc:
        logger.error("%s", exc)
        return 2
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


if __name__ == "__main__":
    sys.exit(main())
