"""A checkpoint trained with Transformer Engine layers at TP=2 exports to ``transformers``.

The TE-tier counterpart of ``tests/conversion/test_export.py``'s trained-model export:
``tests/conversion/conversion_worker.py`` trains the tiny model with TE layers at TP=2
(two processes), saves it, and records its logits on a fixed
image+text prompt and 20 greedy tokens; ``mm1-convert export`` (a subprocess) writes the
Hugging Face folder from the sharded TE checkpoint (TE's fused ``layer_norm_weight`` keys,
``_extra_state`` entries, TP shards), and the exported model reloaded with
``from_pretrained`` must give those logits within the conversion tests' 1e-4 (fp32, a
different attention and MLP implementation: about 1e-6 measured there) and the same
greedy tokens.
"""

from __future__ import annotations

import pytest

from tests.te.conftest import SKIP_REASON, TE_MODE

if TE_MODE is None:  # module fixtures start processes: skip before they are set up
    pytest.skip(SKIP_REASON, allow_module_level=True)

import json
from pathlib import Path

import torch

from tests.conftest import TINY_OVERRIDES
from tests.in_process import run_main
from tests.rank_pool import session_pools
from tests.te.conftest import TE_OVERRIDES

TOLERANCE = 1e-4
NAME = "te_tp2"
TRAIN = [
    *TINY_OVERRIDES,
    *TE_OVERRIDES,
    # Without sequence parallelism: the worker's greedy decoding runs prompts of any length,
    # which a sequence-parallel forward cannot split. SP does not change what is saved.
    "parallel.tensor_parallel_size=2",
    "training.train_steps=4",
    "optimizer.warmup_steps=2",
    "logging.progress_bar=false",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("te_export")
    spec = out / "spec.json"
    spec.write_text(json.dumps({"trains": [{"name": NAME, "overrides": TRAIN}]}))
    session_pools()(2).run("tests.conversion.conversion_worker:run_spec", str(spec), str(out))
    return out


@pytest.fixture(scope="module")
def exported(trained) -> Path:
    from mm1_megatron.conversion.cli import main

    folder = trained / "hf"
    result = run_main(
        main, ["export", "--checkpoint", str(trained / NAME / "ckpt"), "--output", str(folder)]
    )
    assert result.returncode == 0, result.log[-6000:]
    return folder


def test_tp2_te_checkpoint_exports_with_the_trained_logits(trained, exported):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    import mm1_megatron.hf_model.register  # noqa: F401  registers model_type "mm1"

    reference = load_file(str(trained / f"{NAME}.safetensors"))
    model, info = AutoModelForImageTextToText.from_pretrained(exported, output_loading_info=True)
    assert not any(info.values()), info
    model.eval()
    tokens, images = reference["tokens"], reference["images"]
    with torch.no_grad():
        logits = model(input_ids=tokens, pixel_values=images).logits
    assert (logits - reference["prompt_logits"]).abs().max() <= TOLERANCE
    generated = model.generate(
        input_ids=tokens,
        pixel_values=images,
        attention_mask=torch.ones_like(tokens),
        max_new_tokens=20,
        min_new_tokens=20,
        do_sample=False,
    )
    assert generated[:, tokens.shape[1] :].tolist() == reference["generated"].tolist()
