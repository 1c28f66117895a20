"""DPO (``training/preference.py``): the loss and its gradient against the paper's formula
written out pair by pair, on hand-made micro-batches; preference pairs packed without
crossing documents; the synthetic pairs; the config checks. Training runs:
tests/e2e/test_dpo_training.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mm1_megatron.config.schema import PreferenceConfig
from mm1_megatron.training.preference import preference_loss_and_report

# Two rows of 12 positions. Row 0: pair 0 (documents 0, 1), pair 1 (2, 3), padding (4).
# Row 1: pair 0 (0, 1), then padding (2). Answers are the loss-masked positions.
DOCUMENTS = torch.tensor(
    [
        [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4],
        [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2],
    ]
)
MASK = torch.tensor(
    [
        [0, 1, 1, 0, 1, 1, 0, 1, 0, 1, 1, 0],
        [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0],
    ],
    dtype=torch.float32,
)


def _batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    per_token_loss = (torch.rand(2, 12, generator=gen) * 3).requires_grad_(True)
    reference = torch.rand(2, 12, generator=gen) * -5  # per-document log probabilities
    batch = {"document_ids": DOCUMENTS, "loss_mask": MASK, "reference_logps": reference}
    return batch, per_token_loss


def _direct(per_token_loss, batch, settings: PreferenceConfig) -> torch.Tensor:
    """The paper's loss summed over pairs, each term written out from its definition."""
    beta, total = settings.beta, 0.0
    for row in range(2):
        docs, mask = batch["document_ids"][row], batch["loss_mask"][row]
        for pair in range(6):
            chosen, rejected = 2 * pair, 2 * pair + 1
            answer = {d: (docs == d) & (mask > 0) for d in (chosen, rejected)}
            if not (answer[chosen].any() and answer[rejected].any()):
                continue
            logp = {d: -per_token_loss[row][answer[d]].sum() for d in answer}
            ref = {d: batch["reference_logps"][row, d] for d in answer}
            h = beta * ((logp[chosen] - ref[chosen]) - (logp[rejected] - ref[rejected]))
            if settings.loss == "ipo":
                total = total + (h / beta - 1 / (2 * beta)) ** 2
            else:
                eps = settings.label_smoothing
                total = total - (1 - eps) * torch.log(torch.sigmoid(h))
                total = total - eps * torch.log(torch.sigmoid(-h))
            total = total - settings.nll_weight * logp[chosen] / answer[chosen].sum()
    return total


@pytest.mark.parametrize(
    "settings",
    [
        PreferenceConfig(beta=0.1),
        PreferenceConfig(beta=2.0),
        PreferenceConfig(beta=0.5, label_smoothing=0.2),
        PreferenceConfig(beta=0.3, loss="ipo"),
        PreferenceConfig(beta=0.1, nll_weight=0.5),
    ],
    ids=["sigmoid", "sigmoid_large_beta", "conservative", "ipo", "rpo"],
)
def test_loss_and_gradient_equal_the_papers_formula(settings):
    batch, per_token_loss = _batch(seed=0)
    loss, num_pairs, report = preference_loss_and_report(batch, per_token_loss, settings=settings)
    assert int(num_pairs) == 3  # row 0: two pairs; row 1: one
    (grad,) = torch.autograd.grad(loss, per_token_loss)
    direct = _direct(per_token_loss, batch, settings)
    (direct_grad,) = torch.autograd.grad(direct, per_token_loss)
    torch.testing.assert_close(loss, direct, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, direct_grad, rtol=1e-5, atol=1e-6)
    assert torch.all(grad[MASK == 0] == 0)  # prompts and padding get no gradient
    assert report["loss"][1] == 3


def test_a_hand_computed_pair():
    """One pair: policy log p = -1 (chosen), -2 (rejected); reference -1.5 for both;
    beta = 0.5: margin 0.5 * 0.5 - 0.5 * (-0.5) = 0.5, loss log(1 + e^-0.5)."""
    per_token_loss = torch.tensor([[0.0, 1.0, 0.0, 2.0]], requires_grad=True)
    batch = {
        "document_ids": torch.tensor([[0, 0, 1, 1]]),
        "loss_mask": torch.tensor([[0.0, 1.0, 0.0, 1.0]]),
        "reference_logps": torch.tensor([[-1.5, -1.5, 0.0, 0.0]]),
    }
    loss, _, report = preference_loss_and_report(
        batch, per_token_loss, settings=PreferenceConfig(beta=0.5)
    )
    assert float(loss.detach()) == pytest.approx(math.log(1 + math.exp(-0.5)), rel=1e-6)
    assert float(report["dpo/reward_margin"][0]) == pytest.approx(0.5)
    assert float(report["dpo/reward_accuracy"][0]) == 1.0
    loss.backward()
    # d loss / d (chosen token's CE) = beta * sigmoid(-0.5); the rejected one's: minus that.
    slope = 0.5 * (1 - 1 / (1 + math.exp(-0.5)))
    assert per_token_loss.grad.tolist()[0] == pytest.approx([0.0, slope, 0.0, -slope])


def test_policy_equal_to_reference_gives_log_two():
    batch, per_token_loss = _batch(seed=1)
    from mm1_megatron.training.preference import document_logps

    batch["reference_logps"] = document_logps(per_token_loss, batch).detach()
    loss, num_pairs, _ = preference_loss_and_report(
        batch, per_token_loss, settings=PreferenceConfig()
    )
    assert float(loss.detach()) / int(num_pairs) == pytest.approx(math.log(2), rel=1e-6)
    assert F.logsigmoid(torch.tensor(0.0)) == pytest.approx(-math.log(2))


# ---- data --------------------------------------------------------------------------------
def _synthetic(**overrides):
    from mm1_megatron.data.synthetic.sequences import SyntheticSequences

    options = dict(
        seq_length=256,
        num_image_tokens=4,
        max_images=8,
        image_size=56,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        seed=3,
    )
    options.update(overrides)
    return SyntheticSequences({"preference": 1.0}, **options)


def test_pairs_are_packed_whole_each_answer_its_own_document():
    from mm1_megatron.data.tokenizers.base import SyntheticTokenizer

    tokenizer, sequences = SyntheticTokenizer(), _synthetic()
    for index in range(20):
        packed, _ = sequences.sequence(index)
        assert packed.source == "preference"
        num_documents = int(packed.document_ids[: packed.num_real_tokens].max()) + 1
        assert num_documents % 2 == 0 and num_documents >= 2
        images_per_document = []
        for pair in range(num_documents // 2):
            chosen, rejected = (
                packed.document_ids == 2 * pair,
                packed.document_ids == 2 * pair + 1,
            )
            c_tokens, r_tokens = packed.tokens[chosen].tolist(), packed.tokens[rejected].tolist()
            answer_c = packed.loss_mask[chosen] > 0
            # The same prompt (and image) before the answers; the answers differ.
            first_c = int(answer_c.nonzero()[0])
            assert c_tokens[: first_c + 1] == r_tokens[: first_c + 1]
            assert c_tokens != r_tokens
            assert tokenizer.image_token_id in c_tokens[: first_c + 1]
            images_per_document += [c_tokens.count(tokenizer.image_token_id)] * 2
            # Labels stay inside each document: the last position of an answer has none.
            assert not (packed.loss_mask[chosen][-1] > 0)
        # Images in document order: a pair's two copies of its image are equal.
        assert packed.num_images == sum(images_per_document) // 4
        for pair in range(num_documents // 2):
            torch.testing.assert_close(packed.images[2 * pair], packed.images[2 * pair + 1])


def test_sequence_cost_plans_what_the_sequence_holds():
    from mm1_megatron.data.pipeline.balance import cost_of_sequence

    sequences = _synthetic()
    for index in range(5):
        packed, _ = sequences.sequence(index)
        assert sequences.sequence_cost(index) == cost_of_sequence(packed)


def test_synthetic_pairs_state_the_scene_and_one_wrong_fact():
    import numpy as np

    from mm1_megatron.data.synthetic.preferences import synthetic_preference
    from mm1_megatron.data.synthetic.world import caption_words

    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(300):
        pair = synthetic_preference(rng)
        assert pair.chosen != pair.rejected
        if pair.prompt is None or pair.prompt.endswith("describe the picture ."):
            kinds.add("caption" if pair.prompt is None else "describe")
            truth = caption_words(pair.scene)
            assert pair.chosen.split() == truth
            wrong = pair.rejected.split()
            # One fact: one word differs, or a colour with its article ("a red" -> "an
            # orange"); a changed count changes the length (and "is"/"are", "shape(s)").
            if len(wrong) == len(truth):
                differing = [(a, b) for a, b in zip(wrong, truth) if a != b]
                assert len(differing) == 1 or (
                    len(differing) == 2 and {differing[0][0], differing[0][1]} == {"a", "an"}
                ), differing
        else:
            kinds.add(pair.prompt.split()[1])
    assert kinds >= {"caption", "describe", "how", "what", "where", "is"}


DPO_OVERRIDES = ["training.objective=preference", "data.mixture={preference: 1.0}"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["training.objective=preference"], "set data.mixture to {preference: 1.0}"),
        (
            ["training.objective=preference", "data.mixture={preference: 1.0, text: 0.5}"],
            "it has text",
        ),
        (["data.mixture={preference: 1.0}"], "needs training.objective=preference"),
        (
            [
                "training.objective=preference",
                "data.mixture={preference: 1.0}",
                "preference.beta=0",
            ],
            "preference.beta=0.0 must be > 0",
        ),
        (
            [
                "training.objective=preference",
                "data.mixture={preference: 1.0}",
                "preference.loss=ipo",
                "preference.label_smoothing=0.1",
            ],
            "applies to preference.loss=sigmoid only",
        ),
        (["preference.loss=kto"], "preference.loss"),
        (
            ["training.objective=preference", "data.mixture={preference: 1.0}", "eval.interval=5"],
            "set eval.heldout_batches=0",
        ),
        (
            DPO_OVERRIDES + ["model.lora.rank=4", "model.lora.fully_trained=[connector]"],
            "leave model.lora.fully_trained empty",
        ),
        (DPO_OVERRIDES + ["checkpoint.load_dir=/tmp/x"], "set checkpoint.initial_weights"),
        (
            DPO_OVERRIDES + ["data.source=webdataset"],
            "data.mixture.preference=1.0 but data.shards.preference is empty",
        ),
        (DPO_OVERRIDES + ["data.shards.preference=[x]"], "set data.source=webdataset"),
        (DPO_OVERRIDES + ["data.max_images_per_sequence=1"], "cannot hold one preference pair"),
    ],
)
def test_config_checks_name_the_field_and_the_fix(tiny_config, overrides, message):
    with pytest.raises(ValueError) as info:
        tiny_config(*overrides)
    assert message in str(info.value)


def test_a_dpo_run_exports_with_the_chat_template(tiny_config):
    """Its pairs are chat conversations: the exported tokenizer gets the template (and
    the end-of-turn stop), as an SFT run's does; a pre-training run's does not."""
    from mm1_megatron.conversion.exporter import _trained_on_conversations

    assert _trained_on_conversations(tiny_config(*DPO_OVERRIDES))
    assert not _trained_on_conversations(tiny_config())
