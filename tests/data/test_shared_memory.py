"""Images stacked and concatenated in shared memory inside DataLoader workers, with the
values and dtypes torch gives in the main process."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from mm1_megatron.data.pipeline.shared_memory import concat_images, stack_images


def _images(seed: int, dtypes=(torch.float32, torch.float32)):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, 4, generator=generator).to(dtype) for dtype in dtypes]


class _Batches(Dataset):
    """One micro-batch per index: ``sequences`` sequences of two images each."""

    def __init__(self, sequences: int, dtypes=(torch.float32, torch.float32)):
        self.sequences, self.dtypes = sequences, dtypes

    def __len__(self):
        return 3

    def __getitem__(self, index):
        per_sequence = [
            stack_images(_images(10 * index + n, self.dtypes)) for n in range(self.sequences)
        ]
        return concat_images(per_sequence)


def _expected(index: int, sequences: int, dtypes=(torch.float32, torch.float32)):
    return torch.cat([torch.stack(_images(10 * index + n, dtypes)) for n in range(sequences)])


def test_worker_batches_arrive_in_shared_memory_with_the_main_process_values():
    for sequences in (1, 2):
        loader = DataLoader(_Batches(sequences), batch_size=None, num_workers=1)
        for index, images in enumerate(loader):
            assert images.is_shared()
            assert torch.equal(images, _expected(index, sequences))


def test_main_process_batches_are_plain_tensors():
    images = _Batches(2)[0]
    assert not images.is_shared() and torch.equal(images, _expected(0, 2))


def test_mixed_dtypes_promote_in_a_worker_as_in_the_main_process():
    dtypes = (torch.bfloat16, torch.float32)
    loader = DataLoader(_Batches(2, dtypes), batch_size=None, num_workers=1)
    for index, images in enumerate(loader):
        expected = _expected(index, 2, dtypes)
        assert images.dtype == expected.dtype == torch.float32
        assert torch.equal(images, expected)


def test_a_single_sequence_in_the_main_process_is_not_copied():
    (sequence,) = [stack_images(_images(0))]
    assert concat_images([sequence]) is sequence
