#!/usr/bin/env python
"""Build caption or interleaved tar shards (and their manifest) from layouts on disk.

    python tools/build_shards.py coco --captions captions_train2017.json \
        --images train2017/ --out shards/coco
    python tools/build_shards.py llava --json blip_laion_cc_sbu_558k.json \
        --images llava_pretrain/images --out shards/llava
    python tools/build_shards.py conversations --json llava_v1_5_mix665k.json \
        --images llava_sft/ --out shards/sft      # multi-turn conversations, for SFT
    python tools/build_shards.py interleaved --jsonl docs-*.jsonl --images doc_images/ \
        [--url-map downloaded.tsv] --out shards/docs
    python tools/build_shards.py index --kind caption --out shards/laion/manifest.json \
        shards/laion/*.tar          # a manifest for shards made by another tool
    python tools/build_shards.py energon-meta shards/coco   # .nv-meta for energon

Every build also writes Megatron-Energon's ``.nv-meta`` sidecar next to the manifest
(``--no-energon-meta`` skips it), so energon's loader opens the shards as well.
Rerun the same command after an interruption to resume; see docs/data.md for the schema.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mm1_megatron.data.shards.energon_meta import write_energon_meta
from mm1_megatron.data.shards.ingest import (
    coco_items,
    interleaved_items,
    llava_conversation_items,
    llava_items,
    load_url_map,
)
from mm1_megatron.data.shards.reader import SHARD_KINDS, index_existing_shards
from mm1_megatron.data.shards.writer import build_shards, inputs_id
from mm1_megatron.utils.logging_setup import setup_logging

logger = logging.getLogger("build_shards")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (shards + manifest.json)")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument(
        "--verify-images", action="store_true", help="decode every image once and skip corrupt ones"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--no-energon-meta", action="store_true", help="do not write the .nv-meta sidecar"
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    coco = sub.add_parser("coco", help="COCO captions JSON + image folder")
    coco.add_argument("--captions", required=True)
    coco.add_argument("--images", required=True)
    coco.add_argument(
        "--all-captions",
        action="store_true",
        help="one sample per caption (default: per image, its first caption)",
    )
    _common(coco)
    llava = sub.add_parser("llava", help="LLaVA-pretrain JSON + image folder")
    llava.add_argument("--json", required=True)
    llava.add_argument("--images", required=True)
    _common(llava)
    conv = sub.add_parser("conversations", help="LLaVA instruction JSON + image folder")
    conv.add_argument("--json", required=True)
    conv.add_argument("--images", default=".", help="folder the entries' image paths are in")
    _common(conv)
    inter = sub.add_parser("interleaved", help="interleaved documents as JSONL + images")
    inter.add_argument("--jsonl", nargs="+", required=True)
    inter.add_argument("--images", default=".", help="folder for relative image paths")
    inter.add_argument("--url-map", help="TSV of 'url<TAB>downloaded file' for image URLs")
    _common(inter)
    index = sub.add_parser("index", help="write a manifest for existing plain-tar shards")
    index.add_argument("--kind", choices=SHARD_KINDS, required=True)
    index.add_argument("--out", required=True, help="manifest path (or folder)")
    index.add_argument("shards", nargs="+")
    meta = sub.add_parser("energon-meta", help="write .nv-meta for a folder of our shards")
    meta.add_argument("folder", help="folder holding manifest.json and its shards")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        if args.command == "index":
            path = index_existing_shards(args.shards, args.out, args.kind)
            logger.info("wrote %s", path)
            return 0
        if args.command == "energon-meta":
            logger.info("wrote %s", write_energon_meta(args.folder))
            return 0
        if args.command == "coco":
            items = coco_items(args.captions, args.images, all_captions=args.all_captions)
            kind, source = "caption", ("coco", args.captions, args.images, args.all_captions)
        elif args.command == "llava":
            items, kind = llava_items(args.json, args.images), "caption"
            source = ("llava", args.json, args.images)
        elif args.command == "conversations":
            items, kind = llava_conversation_items(args.json, args.images), "conversation"
            source = ("conversations", args.json, args.images)
        else:
            items = interleaved_items(args.jsonl, args.images, url_map=load_url_map(args.url_map))
            kind, source = "interleaved", ("interleaved", args.jsonl, args.images, args.url_map)
        counts = build_shards(
            items,
            args.out,
            kind=kind,
            samples_per_shard=args.samples_per_shard,
            input_id=inputs_id(*source, args.samples_per_shard, args.verify_images),
            verify_images=args.verify_images,
            progress=not args.no_progress,
        )
        if not args.no_energon_meta:
            write_energon_meta(args.out)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    logger.info("done: %s", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
