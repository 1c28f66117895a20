"""``checkpoint.optimizer_sharding=dp_reshardable``: a resumed run continues exactly.

megatron-core's dp_reshardable loader copies into the main parameters outside
``torch.no_grad``; in fp32 (CPU) those are the model's own parameters, and the copy
failed ("a view of a leaf Variable that requires grad is being used in an in-place
operation") until ``compat/optimizer.py`` wrapped it."""

from __future__ import annotations

from tests.checkpoint.test_integrity import _trainer


def test_a_dp_reshardable_checkpoint_resumes_exactly(megatron_single_process, tmp_path):
    common = ("training.train_steps=4", "checkpoint.optimizer_sharding=dp_reshardable")
    reference = _trainer(
        tmp_path / "a",
        *common,
        f"checkpoint.save_dir={tmp_path / 'ckpt'}",
        "checkpoint.save_interval=2",
    )
    expected = [(row["loss"], row["grad_norm"]) for row in reference.train()]
    resumed = _trainer(
        tmp_path / "b", *common, f"checkpoint.load_dir={tmp_path / 'ckpt' / 'step_00000002'}"
    )
    assert resumed.step == 2
    assert [(row["loss"], row["grad_norm"]) for row in resumed.train()] == expected[2:]
