"""``mm1 estimate`` with context parallelism (``parallel.context_parallel_size``): closed-form
checks of what one CP rank holds, sends and computes, the layout search, the longest
sequence that fits, and (slow) the estimate against a measured CP=2 training step on CPU.
"""

from __future__ import annotations

import json

import pytest

from mm1_megatron.config import load_config
from mm1_megatron.scaling.estimate.activations import kernels_for
from mm1_megatron.scaling.estimate.context_parallel import busiest_rank_images, rank_workload
from mm1_megatron.scaling.estimate.estimator import layout_of
from mm1_megatron.scaling.estimate.hardware import gpu_type, link_bandwidth
from mm1_megatron.scaling.estimate.layouts import valid_layouts
from mm1_megatron.scaling.estimate.memory import data_parallel_sizes, estimate_memory
from mm1_megatron.scaling.estimate.model_activations import decoder_terms, logits_terms
from mm1_megatron.scaling.estimate.seq_length_fit import max_seq_length
from mm1_megatron.scaling.estimate.stages import pipeline_stages
from mm1_megatron.scaling.estimate.step_time import ACTIVATION_BYTES, stage_time
from mm1_megatron.scaling.estimate.workload import default_workload
from tests.conftest import CONFIG_DIR, DEBUG_CONFIG
from tests.scaling.test_estimate_memory import CAPTIONS_ONLY, PEAK_TOLERANCE, STATIC_TOLERANCE

MM1_30B = CONFIG_DIR / "mm1_30b.yaml"
H100 = gpu_type("h100")


def _config(*overrides: str, path=MM1_30B):
    return load_config(path, list(overrides))


def _long(seq_length: int, *overrides: str):
    return _config(
        f"training.seq_length={seq_length}",
        f"model.llm.max_sequence_length={seq_length}",
        *overrides,
    )


def _decoder(cfg, w):
    k = kernels_for(cfg.model, device="gpu", bf16=True, fused=True, context_parallel=2)
    stage = pipeline_stages(cfg, 8)[1]
    return decoder_terms(cfg, w, k, stage, cfg.training.micro_batch_size), stage, k


def test_decoder_terms_at_cp2_are_half_the_length_plus_the_gathered_attention():
    cp2 = _long(8192, "parallel.context_parallel_size=2", "parallel.recompute=none")
    cp1 = _long(8192, "parallel.recompute=none")
    share = rank_workload(cp2, default_workload(cp2))
    assert share.seq_length == 4096
    got, stage, k = _decoder(cp2, share)
    half, _, _ = _decoder(cp1, share)
    llm, tp, e = cp2.model.llm, cp2.parallel.tensor_parallel_size, k.bytes_per_value
    layers, micro = len(stage.decoder_layers), cp2.training.micro_batch_size
    # Attention reads the gathered K and V: the fused QKV output and the rotated local
    # keys are no longer kept, the rotated queries are.
    expected = dict(half)
    expected.pop("qkv")
    heads, groups = llm.num_attention_heads, llm.num_query_groups
    expected["rotated_qk"] = half["rotated_qk"] * heads / (heads + groups)
    kv = 2 * 8192 * micro * groups / tp * llm.attention_head_dim
    expected["gathered_kv"] = layers * e * kv
    # Rank 0's last chunk pads to the whole sequence: queries and output, fp32 log-sum-exp.
    heads, d = llm.num_attention_heads / tp, llm.attention_head_dim
    expected["padded_queries"] = layers * micro * 8192 * heads * (2 * e * d + 4)
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recomputation_keeps_no_gathered_keys_and_values(recompute):
    cp2 = _long(8192, "parallel.context_parallel_size=2", f"parallel.recompute={recompute}")
    cp1 = _long(8192, f"parallel.recompute={recompute}")
    share = rank_workload(cp2, default_workload(cp2))
    assert _decoder(cp2, share)[0] == _decoder(cp1, share)[0]


def test_logits_and_images_are_the_ranks_share():
    cfg = _long(8192, "parallel.context_parallel_size=4")
    w = default_workload(cfg)
    share = rank_workload(cfg, w)
    assert (share.seq_length, w.images_per_sequence, share.images_per_sequence) == (2048, 16, 6)
    assert share.attention_pairs_per_sequence == w.attention_pairs_per_sequence // 4
    assert busiest_rank_images(3, 2) == 3  # capped at the sequence's own images
    assert busiest_rank_images(16, 1) == 16
    stage = estimate_memory(cfg, w, num_gpus=64).stages[-1]
    k = kernels_for(cfg.model, device="gpu", bf16=True, fused=True, context_parallel=4)
    micro = cfg.training.micro_batch_size
    assert stage.activation_terms["logits"] == logits_terms(cfg, share, k, micro)


def test_optimizer_state_shards_over_data_and_context_parallel_ranks():
    cp2 = estimate_memory(
        *_with_workload(_config("parallel.context_parallel_size=2", path=DEBUG_CONFIG)),
        num_gpus=2,
    )
    dp2 = estimate_memory(*_with_workload(_config(path=DEBUG_CONFIG)), num_gpus=2)
    assert cp2.stages[0].optimizer_states == dp2.stages[0].optimizer_states
    assert cp2.stages[0].weights == dp2.stages[0].weights


def _with_workload(cfg):
    return cfg, default_workload(cfg)


def test_group_sizes_follow_megatron_core():
    """World = TP x CP x PP x DP; the expert-data-parallel group is world / (ETP x EP x PP)
    (``parallel_state.initialize_model_parallel``); micro-batches are counted over DP."""
    cfg = _config(
        "parallel.context_parallel_size=2",
        "parallel.expert_parallel_size=2",
        path=CONFIG_DIR / "mm1_3b_moe.yaml",
    )
    par = cfg.parallel
    tp, pp = par.tensor_parallel_size, par.pipeline_parallel_size
    etp = par.expert_tensor_parallel_size or tp
    num_gpus = tp * 2 * pp * 4
    sizes = data_parallel_sizes(cfg, num_gpus)
    assert sizes == {"batches": 4, "dense": 8, "experts": num_gpus // (etp * 2 * pp)}


def test_step_time_splits_compute_and_adds_the_kv_collectives():
    cp2 = _long(8192, "parallel.context_parallel_size=2", "parallel.recompute=none")
    cp1 = _long(8192, "parallel.recompute=none")
    w = default_workload(cp2)
    share = rank_workload(cp2, w)
    stage = pipeline_stages(cp2, 8)[1]
    got = stage_time(cp2, w, stage, gpu=H100, efficiency=0.5, dp=2)
    half = stage_time(cp1, share, stage, gpu=H100, efficiency=0.5, dp=2)
    assert (got.forward, got.backward) == pytest.approx((half.forward, half.backward))
    assert got.tensor_parallel == pytest.approx(half.tensor_parallel)
    assert half.context_parallel == 0.0
    llm, tp = cp2.model.llm, cp2.parallel.tensor_parallel_size
    kv_bytes = ACTIVATION_BYTES * 2 * 8192 * llm.num_query_groups / tp * llm.attention_head_dim
    moved = len(stage.decoder_layers) * (1 / 2 + 2 * 1 / 2) * kv_bytes
    bandwidth = link_bandwidth(H100, tp * 2)
    assert got.context_parallel == pytest.approx(moved / bandwidth)
    assert got.total == pytest.approx(half.total + got.context_parallel)


def test_layout_search_lists_cp_layouts_for_long_sequences():
    cps = {g[0].cp for g in valid_layouts(_long(32768), 64, ["none"])}
    assert cps == {1, 2, 4, 8}
    # 4100 = 4 x 1025: two chunks per rank at CP = 2 (TP <= 2 with SP), nothing more.
    no_fp8 = "model.fp8_on_gpu=null"  # its 16-token rule would refuse these lengths itself
    layouts = [g[0] for g in valid_layouts(_long(4100, no_fp8), 64, ["none"])]
    assert {lay.cp for lay in layouts} == {1, 2}
    assert all(lay.tp <= 2 for lay in layouts if lay.cp == 2)
    assert {g[0].cp for g in valid_layouts(_long(4098, no_fp8), 64, ["none"])} == {1}


def _longest(cp: int):
    cfg = _config(f"parallel.context_parallel_size={cp}")
    layout = layout_of(cfg, 64)
    return cfg, max_seq_length(cfg, layout, num_gpus=64, gpu=H100, memory_margin=0.1)


def test_the_longest_sequence_grows_with_cp_and_is_the_longest():
    from mm1_megatron.config import validate_config
    from mm1_megatron.scaling.estimate.seq_length_fit import at_seq_length

    answers = {}
    for cp in (1, 2, 4):
        cfg, fit = _longest(cp)
        answers[cp] = fit.seq_length
        assert fit.seq_length % fit.step == 0
        validate_config(at_seq_length(cfg, fit.seq_length))  # a length the run accepts
        usable = H100.memory_bytes * 0.9
        for length, fits in ((fit.seq_length, True), (fit.seq_length + fit.step, False)):
            longer = at_seq_length(cfg, length)
            peak = estimate_memory(longer, default_workload(longer), num_gpus=64).peak
            assert (peak <= usable) == fits, (cp, length, peak, usable)
    assert answers[1] <= answers[2] <= answers[4], answers
    assert answers[1] < answers[4]


def test_the_cli_prints_the_longest_sequence(capsys):
    from mm1_megatron.scaling.estimate.cli import main

    argv = ["--config", str(MM1_30B), "--max-seq-length", "parallel.context_parallel_size=2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Longest training.seq_length that fits" in out
    assert "TP4 CP2 PP4 DP1 selective" in out
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (fit,) = report["max_seq_length"]
    assert fit["layout"]["cp"] == 2 and fit["max_seq_length"] > 4096


@pytest.mark.slow
def test_estimate_matches_a_measured_cp2_step_on_cpu(tmp_path):
    """Two processes at CP=2 (``tools/check_estimate_memory.py``): each rank's estimate,
    for the images it encoded and the padded queries its attention built, against its step."""
    from tests.launch import launcher, run

    output = tmp_path / "cp2.json"
    command = [
        *launcher(2),
        "tools/check_estimate_memory.py",
        "--config",
        str(DEBUG_CONFIG),
        "parallel.context_parallel_size=2",
        *CAPTIONS_ONLY,
        f"logging.output_dir={tmp_path / 'run'}",
        "--output",
        str(output),
    ]
    result = run(command, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        record = json.loads((tmp_path / f"cp2.cp{rank}.json").read_text())
        rows = record["rows"]
        for name in ("weights", "gradients", "optimizer_states"):
            row = rows[name]
            assert row["estimated"] == pytest.approx(row["measured"], rel=STATIC_TOLERANCE)
        for name in ("activations_peak", "total"):
            row = rows[name]
            assert row["estimated"] == pytest.approx(row["measured"], rel=PEAK_TOLERANCE)
