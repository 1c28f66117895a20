"""Export streams: each unit (embedding, one layer, the head, ...) is read from the
checkpoint on its own, every parameter exactly once, and a checkpoint whose weights do
not match its config.yaml is refused before anything is written."""

from __future__ import annotations

import pytest
import torch
import yaml

from mm1_megatron.config import load_config, save_config
from mm1_megatron.config.schema import MODEL_PARTS
from mm1_megatron.models.param_count import count_parameters

LAYERS = [
    "model.llm.num_layers=6",
    "model.vision.num_layers=3",
    "model.llm.moe.num_experts=4",
    "model.llm.moe.layer_frequency=2",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, megatron_single_process):
    """A debug-shaped MM1 checkpoint (MoE every 2nd layer) saved as a training step."""
    from mm1_megatron.conversion import megatron_io

    cfg = load_config("configs/debug.yaml", LAYERS)
    step = tmp_path_factory.mktemp("stream") / "ckpt" / "step_00000007"
    model = megatron_io.build_tp1_model(cfg.model, image_token_id=3)
    megatron_io.save_parts(model, step, MODEL_PARTS)
    save_config(cfg, step / "config.yaml")
    return step, cfg, megatron_io.state_of(model)


def _export(step, output):
    from mm1_megatron.conversion import ExportRequest, export_checkpoint

    return export_checkpoint(ExportRequest(checkpoint=step, output=output))


def test_export_reads_one_unit_at_a_time(checkpoint, tmp_path, monkeypatch):
    from mm1_megatron.conversion import checkpoint_stream

    step, cfg, state = checkpoint
    reads = []
    original = checkpoint_stream.dcp_load

    def recording_load(state_dict, **kwargs):
        reads.append(sum(t.numel() * t.element_size() for t in state_dict.values()))
        return original(state_dict, **kwargs)

    monkeypatch.setattr(checkpoint_stream, "dcp_load", recording_load)
    _export(step, tmp_path / "out")

    # vision stem + its layers, the connector, embedding + decoder layers (+ each expert
    # of the 3 MoE layers on its own) + final norm/head
    expected_reads = 1 + 3 + 1 + 1 + 6 + 3 * 4 + 1
    assert len(reads) == expected_reads
    total_bytes = 4 * count_parameters(cfg.model).total  # fp32, closed-form count
    assert sum(reads) == total_bytes  # every parameter read once, nothing twice
    assert max(reads) < total_bytes / 4


def test_streamed_tensors_equal_the_saved_model(checkpoint):
    from mm1_megatron.conversion.checkpoint_stream import CheckpointTensors

    step, cfg, state = checkpoint
    source = CheckpointTensors(step, cfg.model, MODEL_PARTS, image_token_id=3)
    names = source.names()
    assert set(names) == {n for n in state if not n.endswith("_extra_state")}
    layer = [n for n in names if ".decoder.layers.2." in n]  # a MoE layer, 4 experts
    assert any("local_experts.3.linear_fc1" in n for n in layer)
    for name, tensor in source.fetch(layer).items():
        assert torch.equal(tensor, state[name]), name


def test_weights_that_do_not_match_the_config_are_refused_up_front(checkpoint, tmp_path):
    from mm1_megatron.conversion.errors import ConversionError

    step, _, _ = checkpoint
    wrong = tmp_path / "wrong" / "step_00000007"
    wrong.mkdir(parents=True)
    (wrong / "model_optim").symlink_to(step / "model_optim")
    tree = yaml.safe_load((step / "config.yaml").read_text())
    tree["model"]["llm"]["ffn_hidden_size"] = 320
    (wrong / "config.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(ConversionError) as error:
        _export(wrong, tmp_path / "out")
    message = str(error.value)
    assert "linear_fc" in message and "640" in message and "768" in message
    assert not (tmp_path / "out").exists()
