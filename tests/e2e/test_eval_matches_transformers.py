"""``mm1-eval``'s greedy captions equal ``transformers`` ``generate()`` on the export.

A tiny debug model (4 decoder layers) is trained at TP=2 on 2 processes and exported with
``mm1-convert export``. ``mm1-eval`` then captions 12 synthetic scenes at 0 and 2 shots
(24 prompts, the 2-shot ones with 3 images) at TP=2 and at PP=2. In this process every
prompt is rebuilt as mm1-eval built it (the demonstrations it recorded, the same
templates and image preprocessing) and given, one prompt at a time and so without any
padding, to the exported ``MM1ForConditionalGeneration.generate()`` with the same
decoding rules: greedy, stop at the end of sequence or at the task's stop text (a full
stop for synthetic captions), never the image, pad or bos tokens
nor an id past the tokenizer's vocabulary. The generated ids must be equal, token for
token: an independent check of mm1-eval's left-padded, KV-cached, model-parallel batches.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

from mm1_megatron.evaluation.protocol import STOP_TEXT
from tests.conftest import TINY_OVERRIDES
from tests.launch import REPO, clean_env, launcher
from tests.parallel.test_layouts import _run_worker
from tests.rank_pool import session_pools

pytestmark = pytest.mark.slow  # trains and evaluates (rank pool), exports in a process

TASK = "synthetic_caption"
LIMIT = 12
SHOTS = (0, 2)
MAX_NEW_TOKENS = 24  # a synthetic caption is 10 to 30 tokens: some rows stop before
NUM_IMAGE_TOKENS = 4  # configs/debug.yaml: model.connector.num_output_tokens
LAYOUTS = {
    "tp2": ("parallel.tensor_parallel_size=2",),
    "pp2": ("parallel.tensor_parallel_size=1", "parallel.pipeline_parallel_size=2"),
}
EXPECTED_LAYOUT = {"tp2": "TP=2 PP=1 EP=1", "pp2": "TP=1 PP=2 EP=1"}

# 100 steps at a high learning rate: enough for captions that depend on the prompt (the
# 2-shot ones differ, some end before the token limit); fewer give one caption for all.
# At 0.02 every prompt got one 24-token caption on an AVX2-only CPU (the run is chaotic:
# kernels that sum in another order change it), at 0.01 7 of 24 stop early there.
# Two-shot prompts reach ~75 tokens, so positions go to 128 while training packs 64.
TRAIN_OVERRIDES = (
    *TINY_OVERRIDES,
    "model.llm.num_layers=4",  # PP=2: two decoder layers per stage
    "model.llm.max_sequence_length=128",
    "parallel.tensor_parallel_size=2",
    "training.train_steps=100",
    "training.global_batch_size=4",
    "training.micro_batch_size=4",
    "optimizer.lr=0.01",
    "optimizer.warmup_steps=3",
    "checkpoint.optimizer_sharding=dp_reshardable",  # the faster save; weights reshard alike
    "logging.tensorboard=false",
    "logging.progress_bar=false",
)


@dataclass
class Trained:
    checkpoint: Path
    export: Path
    export_log: Path
    exporting: subprocess.Popen  # mm1-convert export, overlapping this process' imports

    def wait_for_export(self) -> Path:
        returncode = self.exporting.wait(timeout=600)
        assert returncode == 0, self.export_log.read_text()[-4000:]
        return self.export


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_vs_hf")
    # The TP=2 training run on the session's pool of two ranks (tests/rank_pool.py).
    overrides = [*TRAIN_OVERRIDES, f"checkpoint.save_dir={root / 'ckpt'}"]
    _run_worker(2, {"run": overrides}, root, steps=100)
    command = [*launcher(1), "-m", "mm1_megatron.conversion.cli", "export"]
    command += ["--checkpoint", str(root / "ckpt"), "--output", str(root / "hf")]
    with open(root / "export.log", "w") as log:
        exporting = subprocess.Popen(command, cwd=REPO, env=clean_env(), stdout=log, stderr=log)
    yield Trained(root / "ckpt", root / "hf", root / "export.log", exporting)
    if exporting.poll() is None:  # a failure before the export was waited for
        exporting.kill()
        exporting.wait()


class Reference:
    """Rebuilds mm1-eval's prompts and decodes them with the exported model, one by one."""

    def __init__(self, trained: Trained):
        from transformers import AutoModelForImageTextToText

        import mm1_megatron.hf_model.register  # noqa: F401  registers model_type "mm1"
        from mm1_megatron.data.tokenizers.text import build_tokenizer
        from mm1_megatron.evaluation.model import checkpoint_config
        from mm1_megatron.evaluation.plan import EvalPlan
        from mm1_megatron.evaluation.prompting import PromptBuilder
        from mm1_megatron.evaluation.protocol import Protocol
        from mm1_megatron.evaluation.tasks import load_task

        cfg = checkpoint_config(trained.checkpoint)
        self.tokenizer = build_tokenizer(cfg.data.tokenizer.kind, cfg.data.tokenizer.path)
        self.builder = PromptBuilder(cfg, self.tokenizer)
        # The draw mm1 eval makes from this checkpoint's config (eval.seed, else training.seed).
        seed = EvalPlan.from_config(cfg).seed
        self.task = load_task(TASK, limit=LIMIT, seed=seed)
        self.protocol = Protocol(seed=seed)
        export = trained.wait_for_export()
        self.model = AutoModelForImageTextToText.from_pretrained(export).eval()
        tok = self.tokenizer
        padded_vocab = self.model.config.text_config.vocab_size
        assert padded_vocab > tok.vocab_size  # so the ban past the vocabulary matters
        banned = {tok.image_token_id, tok.pad_token_id, tok.bos_token_id}
        self.suppress = sorted(banned | set(range(tok.vocab_size, padded_vocab)))
        # mm1-eval's stops for the task: end of sequence, and its stop text (protocol.py).
        self.stops = (tok.eos_token_id, *tok.encode(STOP_TEXT[TASK]))
        self.cache: Dict[Tuple[int, str, Tuple[str, ...]], Tuple[List[int], List[float]]] = {}

    def prompt(self, shots: int, record: Dict):
        from mm1_megatron.evaluation.protocol import choose_demos

        query = next(ex for ex in self.task.eval_examples if ex.example_id == record["id"])
        pool = {ex.example_id: ex for ex in self.task.demo_examples}
        demos = [pool[i] for i in record["demos"]]
        drawn = choose_demos(
            self.task.demo_examples, shots, seed=self.protocol.seed, task_name=TASK, query=query
        )  # the protocol's draw, which mm1-eval recorded
        assert [d.example_id for d in drawn] == record["demos"], record["id"]
        template = self.protocol.templates[self.protocol.template_key(TASK, self.task.family)]
        return self.builder.build(template, self.task.family, query, demos)

    def generate(self, shots: int, record: Dict) -> Tuple[List[int], List[float]]:
        """Generated ids without the end-of-sequence token, and at each step the margin of
        the chosen token's score over the runner-up's (for the failure message)."""
        key = (shots, record["id"], tuple(record["demos"]))
        if key not in self.cache:
            prompt = self.prompt(shots, record)
            assert len(prompt.token_ids) == record["prompt_tokens"], key
            assert prompt.images.shape[0] == shots + 1, key
            image_tokens = prompt.token_ids.count(self.tokenizer.image_token_id)
            assert image_tokens == (shots + 1) * NUM_IMAGE_TOKENS, key
            ids = torch.tensor([prompt.token_ids])
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # a tiny model: threads only add overhead
            try:
                with torch.no_grad():
                    out = self.model.generate(
                        input_ids=ids,
                        pixel_values=prompt.images,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=MAX_NEW_TOKENS,
                        do_sample=False,
                        num_beams=1,
                        eos_token_id=list(self.stops),
                        pad_token_id=self.tokenizer.pad_token_id,
                        suppress_tokens=self.suppress,
                        output_scores=True,
                        return_dict_in_generate=True,
                    )
            finally:
                torch.set_num_threads(threads)
            generated = out.sequences[0, ids.shape[1] :].tolist()
            if generated and generated[-1] in self.stops:
                generated = generated[:-1]
            margins = []
            for scores in out.scores:
                top = scores[0].float().topk(2).values
                margins.append(float(top[0] - top[1]))
            self.cache[key] = (generated, margins)
        return self.cache[key]


@pytest.fixture(scope="module")
def reference(trained) -> Reference:
    return Reference(trained)


def _eval(trained: Trained, output: Path, layout: str):
    """``mm1 eval`` on the session's pool of two ranks (as ``torchrun --nproc-per-node 2
    -m mm1_megatron.evaluation.cli`` runs it)."""
    argv = [
        "--checkpoint", str(trained.checkpoint),
        "--output", str(output),
        f"eval.tasks=[{TASK}]",
        f"eval.limit={LIMIT}",
        f"eval.shots=[{', '.join(map(str, SHOTS))}]",
        "eval.num_beams=1",
        f"eval.max_new_tokens={MAX_NEW_TOKENS}",
        "logging.tensorboard=false",
        *LAYOUTS[layout],
    ]  # fmt: skip
    return session_pools()(2).command("mm1_megatron.evaluation.cli:main", argv)


def _difference(tokenizer, shots, record, ours, margins) -> str:
    theirs = record["generated_ids"]
    first = next(
        (i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs))
    )
    margin = f"{margins[first]:.3g}" if first < len(margins) else "n/a"
    return (
        f"{shots}-shot {record['id']} (demos {record['demos']}): first difference at new "
        f"token {first} (transformers' top-2 score margin there: {margin})\n"
        f"  mm1-eval:     {theirs} {tokenizer.decode(theirs)!r}\n"
        f"  transformers: {ours} {tokenizer.decode(ours)!r}"
    )


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_greedy_eval_equals_transformers_generate_on_the_export(
    layout, trained, reference, tmp_path
):
    result = _eval(trained, tmp_path / "eval", layout)
    assert result.returncode == 0, result.stderr[-4000:]
    document = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert document["layout"] == EXPECTED_LAYOUT[layout]
    assert document["decoding"]["num_beams"] == 1

    mismatches, outputs, stopped_early, lengths = [], set(), 0, set()
    for shots in SHOTS:
        path = tmp_path / "eval" / "predictions" / f"{TASK}_{shots}shot.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert sorted(r["id"] for r in records) == [
            ex.example_id for ex in reference.task.eval_examples
        ]
        assert all(len(r["demos"]) == shots for r in records)
        lengths |= {r["prompt_tokens"] for r in records}
        for record in records:
            ours, margins = reference.generate(shots, record)
            outputs.add(tuple(record["generated_ids"]))
            stopped_early += len(record["generated_ids"]) < MAX_NEW_TOKENS
            if ours != record["generated_ids"]:
                mismatches.append(_difference(reference.tokenizer, shots, record, ours, margins))
    compared = LIMIT * len(SHOTS)
    assert not mismatches, f"{len(mismatches)} of {compared} prompts differ at {layout}:\n" + (
        "\n".join(mismatches)
    )
    # The comparison means something: prompts with images in their demonstrations (checked
    # per prompt above: shots + 1 images) and of different lengths (mm1-eval's batches of 8
    # were left-padded), captions that are not all one, and rows that stopped at a stop
    # token while others went on.
    assert compared >= 20
    assert len(lengths) > 2, lengths
    assert len(outputs) > 1, outputs
    assert 0 < stopped_early < compared
