"""Per-document attention against the dense-mask reference, and no s x s tensor in training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from torch.utils._python_dispatch import TorchDispatchMode

from mm1_megatron.batch import model_inputs, run_model
from mm1_megatron.data.build import build_run_data
from mm1_megatron.models.attention import (
    DenseMaskAttention,
    DocumentAttention,
    cu_seqlens,
    decode_against_cache,
    document_segments,
)
from mm1_megatron.models.transformer_configs import RuntimeOptions, language_transformer_config
from tests.conftest import make_tiny_config


def _attention(cls, cfg, mask_type=AttnMaskType.causal):
    config = language_transformer_config(cfg.model, cfg.parallel, RuntimeOptions())
    return cls(config, layer_number=1, attn_mask_type=mask_type, attention_type="self")


def _qkv(cfg, batch, seq, seed=0):
    llm = cfg.model.llm
    head_dim = llm.hidden_size // llm.num_attention_heads
    generator = torch.Generator().manual_seed(seed)

    def make(heads):
        return torch.randn(seq, batch, heads, head_dim, generator=generator).requires_grad_()

    return make(llm.num_attention_heads), make(llm.num_query_groups), make(llm.num_query_groups)


def _random_documents(batch, seq, seed):
    """Rows of contiguous documents of random lengths (1 token and whole-row ones too)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        cuts = torch.randperm(seq - 1, generator=generator)[: int(torch.randint(0, 6, (1,)))]
        starts = torch.zeros(seq, dtype=torch.long)
        starts[cuts + 1] = 1
        rows.append(torch.cumsum(starts, 0))
    return torch.stack(rows)


@pytest.mark.parametrize("seed", range(4))
def test_per_document_attention_equals_the_dense_mask_reference(seeded, seed):
    cfg = make_tiny_config()
    batch, seq = 3, 40
    documents = _random_documents(batch, seq, seed)
    documents[0, -1] = documents[0, -2] + 1  # a one-token document at the very end
    grads = {}
    for cls in (DenseMaskAttention, DocumentAttention):
        q, k, v = _qkv(cfg, batch, seq, seed)
        out = _attention(cls, cfg)(q, k, v, documents)
        out.backward(torch.cos(torch.arange(out.numel(), dtype=torch.float32)).view_as(out))
        grads[cls.__name__] = (out.detach(), q.grad, k.grad, v.grad)
    for reference, new in zip(grads["DenseMaskAttention"], grads["DocumentAttention"]):
        torch.testing.assert_close(new, reference, rtol=1e-5, atol=1e-6)


def _each_document_alone(layer, q, k, v, documents):
    """The closed form: every document through SDPA on its own, outputs placed by hand."""
    out = torch.zeros(q.shape[0], q.shape[1], q.shape[2] * q.shape[3])
    for row, spans in enumerate(document_segments(documents)):
        for start, end in spans:
            piece = (t[start:end, row : row + 1].detach().permute(1, 2, 0, 3) for t in (q, k, v))
            context = torch.nn.functional.scaled_dot_product_attention(
                *piece, is_causal=True, scale=layer.softmax_scale, enable_gqa=True
            )
            out[start:end, row] = context[0].permute(1, 0, 2).reshape(end - start, -1)
    return out


@pytest.mark.parametrize("batch", [1, 3])
def test_per_document_attention_is_each_document_alone_bitwise(seeded, batch):
    cfg = make_tiny_config()
    documents = _random_documents(batch, 40, seed=batch)
    documents[:, 20:] += 100  # at least two documents per row
    q, k, v = _qkv(cfg, batch, 40)
    layer = _attention(DocumentAttention, cfg)
    assert torch.equal(layer(q, k, v, documents), _each_document_alone(layer, q, k, v, documents))


class _AllocatedInBackward(TorchDispatchMode):
    """Elements of every tensor that a non-view op creates."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(tensor, torch.Tensor):
                    self.elements += tensor.numel()
        return out


@pytest.mark.parametrize("batch, documents_per_row", [(1, 1), (1, 32), (3, 32)])
def test_backward_memory_traffic_does_not_grow_with_the_document_count(
    seeded, batch, documents_per_row
):
    """Slicing each document made every slice's backward allocate and add a full-size
    gradient (issue 26): 32 documents moved ~64x the inputs' size (b=1), ~226x (b=3).
    Split views write each gradient once per row (twice with several rows: the stack),
    whatever the number of documents."""
    cfg = make_tiny_config()
    seq = 256
    row = torch.arange(seq).div(seq // documents_per_row, rounding_mode="floor")
    documents = row.repeat(batch, 1)
    q, k, v = _qkv(cfg, batch, seq)
    out = _attention(DocumentAttention, cfg)(q, k, v, documents)
    grad = torch.ones_like(out)
    with _AllocatedInBackward() as allocated:
        out.backward(grad)
    inputs = q.numel() + k.numel() + v.numel()
    assert allocated.elements <= 3 * inputs, allocated.elements / inputs


def test_no_mask_is_bidirectional_attention_as_the_reference(seeded):
    cfg = make_tiny_config()
    outputs = []
    for cls in (DenseMaskAttention, DocumentAttention):
        q, k, v = _qkv(cfg, 2, 9)
        outputs.append(_attention(cls, cfg, AttnMaskType.no_mask)(q, k, v, None))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)


def test_segments_and_cu_seqlens_of_a_packed_batch():
    documents = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0]])
    segments = document_segments(documents)
    assert segments == [[(0, 2), (2, 5), (5, 6)], [(0, 6)]]
    bounds, longest = cu_seqlens(segments, 6, "cpu")
    assert bounds.tolist() == [0, 2, 5, 6, 12] and longest == 6


@pytest.mark.parametrize("num_new", [1, 3])
def test_decoding_against_the_cache_equals_the_whole_sequence(seeded, num_new):
    """The last ``num_new`` queries against all keys (a decode step with a KV cache) give
    the last rows of per-document attention over the whole sequence: through the local
    class, and through ``decode_against_cache``, which the TE class falls back to."""
    cfg = make_tiny_config()
    batch, seq = 3, 12
    documents = _random_documents(batch, seq, seed=num_new)
    documents[1, -1] = documents[1, -2] + 1  # the newest token starts a document
    q, k, v = (t.detach() for t in _qkv(cfg, batch, seq))
    local = _attention(DocumentAttention, cfg)
    whole = local(q, k, v, documents)
    new = q[-num_new:]
    torch.testing.assert_close(local(new, k, v, documents), whole[-num_new:])
    shared = decode_against_cache(new, k, v, documents, softmax_scale=None)  # 1/sqrt(d)
    torch.testing.assert_close(shared, whole[-num_new:])
    scaled = decode_against_cache(new, k, v, documents, softmax_scale=local.softmax_scale / 2)
    assert not torch.allclose(scaled, whole[-num_new:])


@pytest.mark.parametrize("ids_shape", [(1, 30), (2, 40), (1, 50)])
def test_document_ids_that_do_not_cover_the_queries_are_refused(seeded, ids_shape):
    cfg = make_tiny_config()
    q, k, v = _qkv(cfg, 1, 40)
    with pytest.raises(ValueError, match="do not match the queries"):
        _attention(DocumentAttention, cfg)(q, k, v, torch.zeros(ids_shape, dtype=torch.long))


def test_a_dense_mask_is_refused_with_a_pointer_to_model_inputs(seeded):
    cfg = make_tiny_config()
    q, k, v = _qkv(cfg, 1, 4)
    dense = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="model_inputs"):
        _attention(DocumentAttention, cfg)(q, k, v, dense)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.numel() > self.numel:
                self.numel, self.op = tensor.numel(), func
        return out


@pytest.mark.parametrize(
    "attention, bound", [("per_document", "below"), ("dense_mask_reference", "reaches")]
)
@pytest.mark.slow
def test_a_packed_4096_token_step_has_no_s_by_s_tensor(build_tiny_model, attention, bound):
    seq = 4096
    cfg = make_tiny_config(
        f"training.seq_length={seq}",
        f"model.llm.max_sequence_length={seq}",
        "training.micro_batch_size=1",
        "data.mixture={caption: 1.0}",
        f"model.attention={attention}",
    )
    model = build_tiny_model(cfg)
    loader, _ = build_run_data(cfg, seed=0)
    inputs = model_inputs(next(loader), torch.device("cpu"))
    assert int(inputs["document_ids"].max()) >= 8  # a packed sequence of many documents
    tracker = _LargestTensor()
    with tracker:
        per_token = run_model(model, inputs)
        (per_token * inputs["loss_mask"]).sum().backward()
    if bound == "below":
        # The largest are now the logits, s x vocab (256 here) = s * s / 16 elements; the
        # dense mask and the reference's scores are s * s and more.
        assert tracker.numel <= seq * seq // 16, (tracker.numel, tracker.op)
    else:  # the reference really builds the mask: proof the probe sees it
        assert tracker.numel >= seq * seq, (tracker.numel, tracker.op)


def test_segments_are_not_reused_for_new_ids_at_the_same_address():
    """The next micro-batch's ids can sit where the last ones were (same address, shape
    and version): the segments must still be its own. Numpy writes bypass torch's version
    counter, which makes the address reuse deterministic here."""
    buffer = np.array([[0, 0, 0, 1, 1, 1]])
    first = torch.from_numpy(buffer)
    assert document_segments(first) == [[(0, 3), (3, 6)]]
    address = first.data_ptr()
    del first
    buffer[0] = [0, 1, 1, 1, 1, 2]
    second = torch.from_numpy(buffer)
    assert second.data_ptr() == address
    assert document_segments(second) == [[(0, 1), (1, 5), (5, 6)]]
