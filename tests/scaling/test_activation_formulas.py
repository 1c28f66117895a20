"""The estimator's activation memory against the published closed forms.

Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models"
(arXiv:2205.05198), Table 2, bytes per transformer layer of a GPT (16-bit activations,
1-byte dropout masks, LayerNorm, a 4h GELU MLP, attention probabilities materialised):

    no parallelism              s b h (34 + 5 a s / h)
    tensor parallel             s b h (10 + 24 / t + 5 a s / (h t))
    tensor + sequence parallel  s b h (34 + 5 a s / h) / t
    ... + selective recompute   s b h (10 + 24 / t), or 34 s b h / t with SP
    full recompute              2 s b h (the layer input; Megatron-Core splits it over TP
                                with SP: 2 s b h / t)

Megatron-LM (``megatron/training/theoretical_memory_usage.py``) generalises the SP +
selective form to any MLP width as ``s b h (18 + 4 f / h) / t``. It keeps the non-gated
MLP's count for SwiGLU models; the gate makes fc1's output ``2f`` wide, which the last test
here makes explicit, with the other differences of MM1's decoder.
"""

from __future__ import annotations

import pytest

from mm1_megatron.scaling.estimate.activations import Kernels, LayerShape, transformer_layer_terms

S, B, H, A = 2048, 4, 1024, 16
GPT = Kernels.korthikanti_gpt()


def gpt_shape(ffn: int = 4 * H, *, gated: bool = False) -> LayerShape:
    return LayerShape(
        seq_length=S,
        num_sequences=B,
        hidden=H,
        num_heads=A,
        num_query_groups=A,
        ffn_hidden=ffn,
        gated=gated,
        rope=False,
    )


def layer_bytes(shape: LayerShape, kernels: Kernels = GPT, **kwargs) -> float:
    kwargs.setdefault("scores_kept", True)
    return sum(transformer_layer_terms(shape, kernels, **kwargs).values())


@pytest.mark.parametrize("t", [1, 2, 4, 8])
def test_no_recompute_without_and_with_sequence_parallelism(t):
    sbh = S * B * H
    expected_tp = sbh * (10 + 24 / t + 5 * A * S / (H * t))
    assert layer_bytes(gpt_shape(), tp=t, sp=False, recompute="none") == pytest.approx(
        expected_tp, rel=1e-12
    )
    expected_sp = sbh * (34 + 5 * A * S / H) / t
    assert layer_bytes(gpt_shape(), tp=t, sp=True, recompute="none") == pytest.approx(
        expected_sp, rel=1e-12
    )
    if t == 1:  # no parallelism at all
        assert expected_tp == pytest.approx(sbh * (34 + 5 * A * S / H), rel=1e-12)


@pytest.mark.parametrize("t", [1, 2, 4, 8])
def test_selective_recompute(t):
    sbh = S * B * H
    no_sp = layer_bytes(gpt_shape(), tp=t, sp=False, recompute="selective")
    assert no_sp == pytest.approx(sbh * (10 + 24 / t), rel=1e-12)
    with_sp = layer_bytes(gpt_shape(), tp=t, sp=True, recompute="selective")
    assert with_sp == pytest.approx(34 * sbh / t, rel=1e-12)


@pytest.mark.parametrize("t", [1, 4])
def test_full_recompute_keeps_the_layer_input(t):
    sbh = S * B * H
    assert layer_bytes(gpt_shape(), tp=t, sp=False, recompute="full") == 2 * sbh
    assert layer_bytes(gpt_shape(), tp=t, sp=t > 1, recompute="full") == 2 * sbh / t


@pytest.mark.parametrize("ffn", [4 * H, 2816, 3584, 11008])
@pytest.mark.parametrize("t", [1, 2, 8])
def test_megatron_lm_any_mlp_width(ffn, t):
    """Megatron-LM's ``compute_activation_memory`` per layer (SP + selective)."""
    megatron = S * B * H * (18 + 4 * ffn / H) / t
    ours = layer_bytes(gpt_shape(ffn), tp=t, sp=True, recompute="selective")
    assert ours == pytest.approx(megatron, rel=1e-12)


@pytest.mark.parametrize("ffn", [2816, 11008])
def test_swiglu_keeps_a_2f_wide_fc1_output_that_megatron_lm_leaves_out(ffn):
    t = 4
    megatron = S * B * H * (18 + 4 * ffn / H) / t
    gated = layer_bytes(gpt_shape(ffn, gated=True), tp=t, sp=True, recompute="selective")
    assert gated - megatron == pytest.approx(2 * S * B * ffn / t, rel=1e-12)


def test_mm1_decoder_layer_differs_from_the_gpt_formula_by_named_terms():
    """MM1's decoder on a GPU (fused RMSNorm and SwiGLU, per-document flash attention,
    RoPE, grouped-query attention, no dropout) against Korthikanti's GPT, term by term:
    no probabilities (flash keeps an fp32 log-sum-exp per head), no dropout masks, the
    gate's 2 s b f, K and V of g groups instead of a heads, RoPE's rotated Q and K beside
    the fused QKV output, a second attention-output copy (the per-document concatenation),
    norm statistics and RoPE tables."""
    t, ffn, groups = 4, 2816, 4
    head_dim = H // A
    mm1 = Kernels(
        bytes_per_value=2,
        rmsnorm_copies=1,
        rotated_qk_copies=True,
        decoder_scores_kept=False,
        vision_scores_kept=True,
        decoder_output_copies=2,
        swiglu_extra_copies=0,
        gelu_extra_copies=0,
    )
    shape = LayerShape(S, B, H, A, groups, ffn, gated=True, rope=True)
    ours = layer_bytes(
        shape,
        mm1,
        tp=t,
        sp=True,
        recompute="none",
        scores_kept=False,
        output_copies=2,
        rmsnorm=True,
    )
    sb = S * B
    gpt = sb * H * (34 + 5 * A * S / H) / t  # the paper's TP + SP row, f = 4h
    differences = {
        "flash: no probabilities, dropped copies or mask": -5 * A * S * sb / t,
        "flash: fp32 log-sum-exp": 4 * A * sb / t,
        "no dropout masks": -2 * sb * H / t,
        "MLP width f instead of 4h, gated": 2 * sb * (3 * ffn - 8 * H) / t,
        "grouped K and V": -2 * 2 * (A - groups) * head_dim * sb / t,
        "RoPE's rotated Q and K": 2 * (A + groups) * head_dim * sb / t,
        "second attention-output copy": 2 * sb * H / t,
        "RMSNorm statistics (fp32)": 2 * 4 * sb / t,
        "RoPE cos/sin tables (fp32)": 4 * 4 * S * head_dim,
    }
    assert ours == pytest.approx(gpt + sum(differences.values()), rel=1e-12)
