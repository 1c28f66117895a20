"""Multi-process half of the conversion tests, run once under torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        tests/conversion/conversion_worker.py SPEC.json OUT_DIR

SPEC.json has
- ``loads``: imported checkpoints to load at a TP/EP layout the way training does
  (``CheckpointManager.load_pretrained_part``), run on the inputs file, and record
  (``OUT_DIR/<name>.safetensors``: ``output`` = full logits or ViT features; an inputs
  file with ``patches`` and ``grid_sizes`` runs the native-resolution ViT on them);
- ``trains``: short training runs of the debug model at a layout, saved at the end, then
  ``prompt_logits`` and 20 greedy tokens (``generated``, end-of-sequence masked) of the
  trained model on a fixed image+text prompt (``OUT_DIR/<name>.safetensors``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from mm1_megatron.utils.logging_setup import setup_logging  # noqa: E402
from tests.parallel.layout_worker import release_trainer  # noqa: E402

NUM_GENERATED = 20


def _placeholders(model_cfg, part: str):
    """Small TP-friendly stand-ins for the part a load does not read."""
    from dataclasses import replace

    from mm1_megatron.config.schema import ConnectorConfig, LanguageModelConfig, VisionEncoderConfig

    if part == "language_model":
        vision = VisionEncoderConfig(
            image_size=28,
            patch_size=14,
            hidden_size=16,
            num_layers=1,
            num_attention_heads=2,
            ffn_hidden_size=16,
        )
        return replace(
            model_cfg,
            vision=vision,
            connector=ConnectorConfig(type="mlp", num_output_tokens=4, hidden_size=16),
        )
    llm = LanguageModelConfig(
        vocab_size=16,
        hidden_size=16,
        num_layers=1,
        num_attention_heads=2,
        ffn_hidden_size=16,
        max_sequence_length=16,
    )
    return replace(
        model_cfg,
        llm=llm,
        connector=ConnectorConfig(type="mlp", num_output_tokens=4, hidden_size=16),
    )


def _full_logits(logits):
    from megatron.core import tensor_parallel

    return tensor_parallel.gather_from_tensor_model_parallel_region(logits.contiguous())


def _run_load(spec: dict, out: Path) -> None:
    import torch
    from megatron.core import parallel_state
    from safetensors.torch import load_file, save_file

    from mm1_megatron.checkpoint import CheckpointManager
    from mm1_megatron.config import CheckpointConfig, ParallelConfig, load_config
    from mm1_megatron.models import build_mm1_model
    from mm1_megatron.parallel import init_distributed, seed_everything

    parallel = ParallelConfig(**spec["parallel"])
    init_distributed(parallel)
    seed_everything(1)
    ckpt = Path(spec["checkpoint"])
    cfg = load_config(ckpt / "step_00000000" / "config.yaml")
    model = build_mm1_model(
        _placeholders(cfg.model, spec["part"]),
        parallel,
        image_token_id=0,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        init_seed=1,
    ).eval()
    CheckpointManager(CheckpointConfig()).load_pretrained_part(model, spec["part"] + ".", ckpt)
    inputs = load_file(spec["inputs"])
    with torch.no_grad():
        if spec["part"] == "vision_encoder" and "grid_sizes" in inputs:  # packed images
            output = model.vision_encoder.encode_packed(inputs["patches"], inputs["grid_sizes"])
        elif spec["part"] == "vision_encoder":
            output = model.vision_encoder(inputs["images"])
        elif parallel.pipeline_parallel_size > 1:
            output = _pipelined_logits(model, inputs["tokens"])
        else:
            tokens = inputs["tokens"]
            positions = torch.arange(tokens.shape[1]).expand_as(tokens)
            mask = torch.zeros_like(tokens)
            output = _full_logits(model(tokens, positions, mask))
    writer = (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    )
    if writer:
        save_file({"output": output.contiguous()}, str(out / f"{spec['name']}.safetensors"))
    parallel_state.destroy_model_parallel()


def _pipelined_logits(model, tokens):
    """Logits on the last stage through Megatron-Core's pipeline schedule (forward only)."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        positions = torch.arange(batch.shape[1]).expand_as(batch)
        logits = chunk(batch, positions, torch.zeros_like(batch))
        return logits, lambda output, non_loss_data=False: output

    collected = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([tokens]),
        model=[model],
        num_microbatches=1,
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=True,
        collect_non_loss_data=True,
    )
    return _full_logits(collected[0]) if collected else None


def _prompt(tokenizer, image_size: int, num_image_tokens: int):
    import torch

    text = tokenizer.encode("the picture shows a red circle on a white background . it is")
    tokens = [tokenizer.bos_token_id] + [tokenizer.image_token_id] * num_image_tokens + text
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(1, 3, image_size, image_size, generator=generator)
    return torch.tensor([tokens]), images


def _greedy(model, tokens, images, eos_id: int):
    """``NUM_GENERATED`` greedy tokens, recomputing the whole sequence each step."""
    import torch

    first_logits = None
    for _ in range(NUM_GENERATED):
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        mask = torch.zeros_like(tokens)
        logits = _full_logits(model(tokens, positions, mask, images=images))
        first_logits = logits if first_logits is None else first_logits
        last = logits[0, -1].clone()
        last[eos_id] = float("-inf")
        next_token = last.argmax().reshape(1, 1)
        torch.distributed.broadcast(next_token, src=0)
        tokens = torch.cat([tokens, next_token], dim=1)
    return first_logits, tokens[:, -NUM_GENERATED:]


def _run_train(spec: dict, out: Path) -> None:
    import torch
    from megatron.core import parallel_state
    from safetensors.torch import save_file

    from mm1_megatron.checkpoint import unwrap
    from mm1_megatron.config import load_config, validate_config
    from mm1_megatron.training.trainer import Trainer

    run_dir = out / spec["name"]
    cfg = validate_config(
        load_config(
            REPO / "configs/debug.yaml",
            [
                f"logging.output_dir={run_dir}",
                "logging.tensorboard=false",
                f"checkpoint.save_dir={run_dir / 'ckpt'}",
                *spec["overrides"],
            ],
        )
    )
    trainer = Trainer(cfg)
    trainer.train()
    model = unwrap(trainer.model_chunks[0]).eval()
    tokenizer = trainer.tokenizer
    tokens, images = _prompt(
        tokenizer, cfg.model.vision.image_size, cfg.model.connector.num_output_tokens
    )
    with torch.no_grad():
        logits, generated = _greedy(model, tokens, images, tokenizer.eos_token_id)
    if torch.distributed.get_rank() == 0:
        save_file(
            {
                "tokens": tokens,
                "images": images,
                "prompt_logits": logits.contiguous(),
                "generated": generated.contiguous(),
            },
            str(out / f"{spec['name']}.safetensors"),
        )
    release_trainer(trainer)
    del trainer, model
    parallel_state.destroy_model_parallel()


def run_spec(spec_path: str, out_dir: str) -> None:
    """The spec's loads, then its trains; the world group stays up (a rank pool runs this)."""
    spec = json.loads(Path(spec_path).read_text())
    out = Path(out_dir)
    for load in spec.get("loads", []):
        _run_load(load, out)
    for train in spec.get("trains", []):
        _run_train(train, out)


def main(spec_path: str, out_dir: str) -> None:
    setup_logging()
    from mm1_megatron.parallel import shutdown_distributed

    run_spec(spec_path, out_dir)
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
