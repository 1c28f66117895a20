"""What a user who turns Transformer Engine on does first (issue 24, N1-N4), on TE layers.

Each test failed on the code before the fix (with the stand-in or real TE):

- N1: a TE run resumed from its own checkpoint (``core_attention._extra_state`` is in
  ``state_dict()`` but never in a checkpoint: a strict load raised);
- N2: a TE run started from a local-layer checkpoint (``checkpoint.initial_weights``; the
  ``TENorm`` extra state was requested and absent);
- N3: a TE MoE checkpoint read into local layers (eval, export) and a local MoE checkpoint
  into TE layers (the pre-MLP norm had two names);
- N4: KV-cached generation on TE layers (the TE attention refused every decode step).
"""

from __future__ import annotations

import pytest

from tests.te.conftest import SKIP_REASON, TE_MODE

if TE_MODE is None:  # before the Megatron-Core imports: the skip costs nothing
    pytest.skip(SKIP_REASON, allow_module_level=True)

import torch  # noqa: E402

from mm1_megatron.checkpoint.manager import load_model_weights, unwrap  # noqa: E402
from mm1_megatron.inference import generate  # noqa: E402
from tests.checkpoint.test_integrity import _trainer  # noqa: E402
from tests.te.test_standin_smoke import _build, _sharded_leaves, _te_config  # noqa: E402
from tests.unit.test_generation import (  # noqa: E402
    TOKENIZER,
    _config,
    _prompts,
    _reference_greedy,
)

MOE = ("model.llm.moe.num_experts=4", "model.llm.moe.top_k=2")
VARIANTS = {"dense": (), "moe": (*MOE, "model.llm.moe.grouped_gemm=true")}
LOCAL_VARIANTS = {"dense": (), "moe": MOE}


@pytest.fixture(autouse=True)
def _moe_loss_scale():
    """Megatron's schedule sets this ``[1]`` scale before each forward; a MoE backward
    outside a schedule earlier in the session may have left a ``[]`` one."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))


def _weights_by_key(chunk):
    return {key: tensor.detach().clone() for key, tensor in _sharded_leaves(unwrap(chunk)).items()}


def _assert_same_weights(ours, theirs):
    assert ours.keys() == theirs.keys()
    for key, tensor in ours.items():
        assert torch.equal(tensor, theirs[key]), key


def _saved_te_moe_run(tmp_path, te_overrides):
    """A one-step TE MoE run (grouped experts) saved in ``tmp_path / "ckpt"``."""
    te = _trainer(
        tmp_path / "te",
        *te_overrides,
        *VARIANTS["moe"],
        "training.train_steps=1",
        f"checkpoint.save_dir={tmp_path / 'ckpt'}",
        "checkpoint.save_interval=1",
    )
    te.train()
    te.checkpoints.close()
    return te


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_n1_a_te_run_resumes_exactly(megatron_single_process, tmp_path, te_overrides, variant):
    common = (*te_overrides, *VARIANTS[variant], "training.train_steps=4")
    reference = _trainer(
        tmp_path / "a",
        *common,
        f"checkpoint.save_dir={tmp_path / 'ckpt'}",
        "checkpoint.save_interval=2",
    )
    expected = [(row["loss"], row["grad_norm"]) for row in reference.train()]
    reference.checkpoints.close()
    resumed = _trainer(
        tmp_path / "b", *common, f"checkpoint.load_dir={tmp_path / 'ckpt' / 'step_00000002'}"
    )
    assert resumed.step == 2
    assert [(row["loss"], row["grad_norm"]) for row in resumed.train()] == expected[2:]


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_n2_a_local_checkpoint_starts_a_te_run(
    megatron_single_process, tmp_path, te_overrides, variant
):
    """The MM1 start: weights imported or trained with local layers, training on TE."""
    local = _trainer(
        tmp_path / "local",
        *LOCAL_VARIANTS[variant],
        "training.train_steps=1",
        f"checkpoint.save_dir={tmp_path / 'ckpt'}",
        "checkpoint.save_interval=1",
    )
    local.train()
    local.checkpoints.close()
    te = _trainer(
        tmp_path / "te",
        *te_overrides,
        *VARIANTS[variant],
        "training.train_steps=1",
        f"checkpoint.initial_weights={tmp_path / 'ckpt'}",
    )
    _assert_same_weights(
        _weights_by_key(te.model_chunks[0]), _weights_by_key(local.model_chunks[0])
    )


def test_n3_a_te_moe_checkpoint_loads_into_local_layers(
    megatron_single_process, tmp_path, te_overrides
):
    """What ``mm1-eval ... model.transformer_impl=local`` and ``mm1-convert export`` do."""
    te = _saved_te_moe_run(tmp_path, te_overrides)
    local = _trainer(tmp_path / "local", *LOCAL_VARIANTS["moe"], "training.train_steps=1")
    load_model_weights(local.model_chunks[0], tmp_path / "ckpt")
    _assert_same_weights(
        _weights_by_key(local.model_chunks[0]), _weights_by_key(te.model_chunks[0])
    )


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_n4_cached_generation_on_te_layers_equals_full_recompute(seeded, te_overrides, variant):
    """Prefill through TE's THD attention, then decode steps against the KV cache, equal
    to running the whole sequence again for every token (no cache at all)."""
    cfg = _te_config(
        te_overrides, variant, "model.llm.max_sequence_length=256", "training.seq_length=256"
    )
    model = _build(cfg, seeded).eval()
    prompts = _prompts(cfg, 4)
    config = _config()
    outputs = generate(model, prompts, config, pad_token_id=TOKENIZER.pad_token_id)
    assert outputs == [_reference_greedy(model, p, config) for p in prompts]
    assert any(len(o) == config.max_new_tokens for o in outputs)


@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_n6_te_attention_builds_one_layout_per_micro_batch(
    build_tiny_model, monkeypatch, te_overrides, recompute
):
    """``cu_seqlens`` once per micro-batch for every TE layer, also when core attention
    is recomputed in backward (it was built in each layer's forward, from a Python list:
    a blocking host-to-device copy per layer on a GPU)."""
    from mm1_megatron.batch import documents
    from mm1_megatron.data.build import build_run_data
    from tests.unit.test_document_layout import NUM_LAYERS, _Spy, _step

    overrides = (f"model.llm.num_layers={NUM_LAYERS}", "data.mixture={caption: 1.0}")
    cfg = _te_config(te_overrides, "dense", *overrides, f"parallel.recompute={recompute}")
    model = build_tiny_model(cfg)
    loader, _ = build_run_data(cfg, seed=0)
    segments = _Spy(monkeypatch, documents, "compute_segments")
    bounds = _Spy(monkeypatch, documents, "build_cu_seqlens")
    for _ in range(2):
        host_batch = next(loader)
        before = segments.calls, bounds.calls
        _, grads, counter = _step(model, host_batch)
        built = segments.calls - before[0], bounds.calls - before[1]
        assert built == (1, 1), f"{built} (segments, cu_seqlens) builds for one micro-batch"
        assert counter.copies == [], counter.copies
        assert grads


def test_n4_periodic_evaluation_during_a_te_run(megatron_single_process, tmp_path, te_overrides):
    """A TE run with ``eval.interval`` used to die at its first few-shot evaluation."""
    trainer = _trainer(
        tmp_path / "run",
        *te_overrides,
        "training.train_steps=2",
        "eval.interval=2",
        "eval.tasks=[synthetic_vqa]",
        "eval.limit=4",
        "eval.heldout_batches=1",
    )
    rows = trainer.train()
    scores = [key for row in rows for key in row if "synthetic_vqa" in key]
    assert scores, rows[-1].keys()


@pytest.mark.slow  # the command's own process
def test_mm1_eval_of_a_te_moe_checkpoint(megatron_single_process, tmp_path, te_overrides):
    """``mm1-eval`` on what a TE MoE run saved: TE layers where CUDA runs them, local
    layers here (the same keys), FP8 off; the command's own process, as users run it."""
    from tests.launch import launcher, run

    _saved_te_moe_run(tmp_path, te_overrides)
    command = [
        *launcher(1), "-m", "mm1_megatron.evaluation.cli",
        "--checkpoint", str(tmp_path / "ckpt"),
        "--output", str(tmp_path / "eval"),
        "eval.tasks=[synthetic_vqa]", "eval.limit=4", "eval.shots=[0]",
        "logging.tensorboard=false",
    ]  # fmt: skip
    result = run(command, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    if TE_MODE == "standin":
        assert "evaluated as local layers" in log
    assert any((tmp_path / "eval").rglob("*.json"))


def test_n3_a_te_moe_checkpoint_exports_to_transformers(
    megatron_single_process, tmp_path, te_overrides
):
    """``mm1-convert export`` of a TE MoE run: the ``transformers`` model computes the TE
    model's logits (fp32)."""
    from transformers import AutoModelForImageTextToText

    import mm1_megatron.hf_model.register  # noqa: F401  registers model_type "mm1"
    from mm1_megatron.batch import run_model
    from tests.conversion.conftest import export_to

    te = _saved_te_moe_run(tmp_path, te_overrides)
    folder = export_to(tmp_path / "ckpt", tmp_path / "hf")
    exported = AutoModelForImageTextToText.from_pretrained(folder).eval()
    prompt = _prompts(te.cfg, 3)[2]  # two images
    tokens = torch.tensor([prompt.token_ids])
    inputs = {
        "tokens": tokens,
        "position_ids": torch.arange(tokens.shape[1])[None],
        "document_ids": torch.zeros_like(tokens),
        "images": prompt.images,
    }
    model = unwrap(te.model_chunks[0]).eval()
    with torch.no_grad():
        ours = run_model(model, inputs, with_labels=False)
        theirs = exported(input_ids=tokens, pixel_values=prompt.images).logits
    assert (ours - theirs).abs().max() <= 1e-4 * ours.abs().max()


@pytest.mark.parametrize("source", ["llama", "mixtral"])
def test_n2_a_hugging_face_import_loads_into_te_layers(
    megatron_single_process, seeded, tmp_path, te_overrides, source
):
    """MM1's start: ``mm1-convert import`` of a Hugging Face decoder, then the TE model
    loads it as training does (``checkpoint.pretrained_language_model``) and computes
    the ``transformers`` model's logits."""
    import dataclasses

    from mm1_megatron.config import load_config
    from mm1_megatron.conversion import ImportRequest, import_checkpoint, megatron_io
    from mm1_megatron.models import build_mm1_model
    from tests.conversion.conftest import TOLERANCE
    from tests.conversion.hf_sources import build_source
    from tests.conversion.test_import import our_logits

    reference = build_source(source, tmp_path / "hf", seed=3)
    import_checkpoint(ImportRequest(output=tmp_path / "imported", language_model=tmp_path / "hf"))
    step = megatron_io.resolve_step_folder(tmp_path / "imported")
    model_cfg = megatron_io.placeholder_model_config(
        load_config(step / "config.yaml").model, ["language_model"]
    )
    llm = model_cfg.llm
    if llm.moe.num_experts:
        llm = dataclasses.replace(llm, moe=dataclasses.replace(llm.moe, grouped_gemm=True))
    model_cfg = dataclasses.replace(model_cfg, transformer_impl="transformer_engine", llm=llm)
    seeded(11)
    parallel = load_config(step / "config.yaml").parallel
    model = build_mm1_model(model_cfg, parallel, image_token_id=0).eval()
    load_model_weights(model, tmp_path / "imported", prefix="language_model.")
    tokens = torch.randint(
        0, llm.vocab_size - 2, (2, 12), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        theirs = reference(tokens).logits
    diff = our_logits(model, tokens) - theirs
    assert diff.abs().max() <= TOLERANCE


def test_fp8_extra_state_with_megatron_s_recipe_passes_the_check():
    """TE pickles the recipe object it was given, and megatron-core gives its own subclass
    (``TEDelayedScaling``): an FP8 checkpoint of ours must pass the extra-state check."""
    import pickle

    from megatron.core.extensions.transformer_engine import TEDelayedScaling
    from transformer_engine.common.recipe import DelayedScaling

    from mm1_megatron.compat.te_extra_state import check_extra_state

    recipe = TEDelayedScaling.__new__(TEDelayedScaling)
    recipe.__dict__.update(vars(DelayedScaling()))
    state = {"recipe": recipe, "scale_fwd": torch.ones(3), "extra_fp8_variables": {}}
    payload = torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)
    check_extra_state(payload, source="ckpt: linear_qkv._extra_state")
