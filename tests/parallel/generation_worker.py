"""Generate with the tiny model at several parallel layouts in one set of processes.

Run under torchrun (or plain python for the single-process references):

    python tests/parallel/generation_worker.py SPEC.json OUT_DIR

SPEC.json: {"layouts": {"name": ["dotted.override=value", ...], ...}}. Each layout starts
from ``tests.conftest.make_tiny_config`` plus ``BASE_OVERRIDES``; the model is built with
``init_seed`` (the same weights at every layout, no checkpoint). Global rank 0 writes
OUT_DIR/<name>.json: for every prompt group and search mode (``GENERATIONS``) the
generated ids of each prompt.

The prompts form ``NUM_GROUPS`` groups of different sizes, and each group is one
``generate`` call. Data-parallel rank ``d`` generates groups ``d, d + DP, ...``; a
single data-parallel rank generates them all, one call per group, so every layout feeds
the model the same left-padded batches as the single-process reference. With expert
parallelism the data-parallel ranks exchange tokens in every MoE layer and step
together (``lockstep_group``), although they hold different prompts.

Each group is generated twice per mode: ``free`` (end of sequence as the only stop
token) and ``stopped``, where group 1 also stops on the second token of each of its
greedy ``free`` outputs, so its search is done after at most two steps while group 0
runs to ``MAX_NEW_TOKENS``: with expert parallelism the finished rank must keep
stepping until the other one is done.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

SEED = 1234
# A rank left waiting in a collective (ranks out of step) fails after this long instead
# of hanging until the 30-minute default.
COLLECTIVE_TIMEOUT_MINUTES = 1.5
MAX_NEW_TOKENS = 8
NUM_GROUPS = 2
GROUP_SIZES = (5, 3)  # group 1 holds fewer (and shorter-running) prompts
NUM_BEAMS = {"greedy": 1, "beam3": 3}
# Four decoder layers leave room for an uneven pipeline split; longer sequences for the
# prompts (up to two images of four tokens each) plus the generated tokens.
BASE_OVERRIDES = (
    "model.llm.num_layers=4",
    "model.llm.max_sequence_length=128",
    "training.seq_length=128",
    "parallel.sequence_parallel=false",
)
WORDS = ["there", "are", "two", "shapes", "on", "a", "gray", "background", ":"]


def make_prompts(cfg, tokenizer, count: int, seed: int):
    """``count`` prompts with 0, 1 or 2 images and text of different lengths."""
    import numpy as np
    import torch

    from mm1_megatron.batch.contract import expand_image_placeholders
    from mm1_megatron.data.synthetic.world import draw_scene, random_scene
    from mm1_megatron.inference import Prompt

    rng = np.random.default_rng(seed)
    size = cfg.model.vision.image_size
    prompts = []
    for i in range(count):
        num_images = (i + seed) % 3
        ids = [tokenizer.bos_token_id]
        for j in range(num_images):
            ids += [tokenizer.image_token_id]
            ids += tokenizer.encode(" ".join(WORDS[: 1 + (i + j) % 4]))
        ids += tokenizer.encode(" ".join(WORDS[: 2 + (i * 5 + seed) % 7]))
        ids = expand_image_placeholders(
            ids,
            image_token_id=tokenizer.image_token_id,
            num_image_tokens=cfg.model.connector.num_output_tokens,
        )
        images = [draw_scene(random_scene(rng), size) for _ in range(num_images)]
        images = torch.stack(images) if images else torch.empty(0, 3, size, size)
        prompts.append(Prompt(token_ids=ids, images=images))
    return prompts


def prompt_groups(cfg, tokenizer):
    return [make_prompts(cfg, tokenizer, n, seed=g) for g, n in enumerate(GROUP_SIZES)]


def _generation_config(tokenizer, num_beams: int, extra_stop=()):
    from mm1_megatron.inference import GenerationConfig

    return GenerationConfig(
        max_new_tokens=MAX_NEW_TOKENS,
        num_beams=num_beams,
        stop_token_ids=(tokenizer.eos_token_id, *sorted(extra_stop)),
        banned_token_ids=(tokenizer.image_token_id, tokenizer.pad_token_id),
    )


def _generate_group(model, prompts, group: int, tokenizer, lockstep_group) -> dict:
    """{"greedy_free", "greedy_stopped", "beam3_free", "beam3_stopped"} -> outputs."""
    from mm1_megatron.inference import generate

    def run(num_beams, extra_stop=()):
        config = _generation_config(tokenizer, num_beams, extra_stop)
        return generate(
            model,
            prompts,
            config,
            pad_token_id=tokenizer.pad_token_id,
            lockstep_group=lockstep_group,
        )

    results = {"greedy_free": run(1)}
    # Group 1 ends early: it also stops on the second token of each greedy output.
    early = {out[1] for out in results["greedy_free"] if len(out) > 1} if group == 1 else set()
    results["greedy_stopped"] = run(1, early)
    results["beam3_free"] = run(NUM_BEAMS["beam3"])
    results["beam3_stopped"] = run(NUM_BEAMS["beam3"], early)
    results["early_stop_ids"] = sorted(early)
    return results


def run_layout(name: str, overrides, out: Path) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from mm1_megatron.data.tokenizers.base import SyntheticTokenizer
    from mm1_megatron.models import build_mm1_model
    from mm1_megatron.parallel import init_distributed, seed_everything
    from mm1_megatron.parallel.collectives import all_gather_objects
    from tests.conftest import make_tiny_config

    tokenizer = SyntheticTokenizer()
    cfg = make_tiny_config(*BASE_OVERRIDES, *overrides)
    init_distributed(cfg.parallel, timeout_minutes=COLLECTIVE_TIMEOUT_MINUTES)
    seed_everything(SEED)
    model = build_mm1_model(
        cfg.model,
        cfg.parallel,
        image_token_id=tokenizer.image_token_id,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        init_seed=SEED,
    )
    model.eval()
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    groups = prompt_groups(cfg, tokenizer)
    if NUM_GROUPS % dp_size:
        raise ValueError(f"{NUM_GROUPS} prompt groups do not split over {dp_size} DP ranks")
    lockstep = parallel_state.get_data_parallel_group() if dp_size > 1 else None
    start = time.perf_counter()
    mine = {
        group: _generate_group(model, groups[group], group, tokenizer, lockstep)
        for group in range(dp_rank, NUM_GROUPS, dp_size)
    }
    seconds = time.perf_counter() - start
    gathered = mine
    if dp_size > 1:
        gathered = {}
        for part in all_gather_objects(mine, group=parallel_state.get_data_parallel_group()):
            gathered.update(part)
    if not dist.is_initialized() or dist.get_rank() == 0:
        record = {
            "groups": {str(g): gathered[g] for g in sorted(gathered)},
            "data_parallel_size": dp_size,
            "seconds": seconds,
        }
        (out / f"{name}.json").write_text(json.dumps(record))
    del model
    from tests.parallel.layout_worker import _forget_model_parallel_groups

    _forget_model_parallel_groups()


def run_layouts(spec_path: str, out_dir: str) -> None:
    """Every layout of the spec; the world group stays up (a rank pool runs this)."""
    spec = json.loads(Path(spec_path).read_text())
    out = Path(out_dir)
    for name, overrides in spec["layouts"].items():
        run_layout(name, overrides, out)


def main(spec_path: str, out_dir: str) -> None:
    from mm1_megatron.parallel import shutdown_distributed
    from mm1_megatron.utils.logging_setup import setup_logging

    setup_logging()
    run_layouts(spec_path, out_dir)
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
