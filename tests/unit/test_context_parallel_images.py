"""A context-parallel rank's share of the first stage's input: its positions of each row,
and only the images with a token there (``batch.context_parallel.local_image_tokens``,
``batch.image_patches.select_images``), checked against the whole row merged by
``merge_image_embeddings`` then cut to the share, and a brute-force search of the images
each share touches."""

from __future__ import annotations

import pytest
import torch

from mm1_megatron.batch.context_parallel import local_image_tokens, row_shard
from mm1_megatron.batch.contract import merge_image_embeddings
from mm1_megatron.batch.image_patches import select_images

IMAGE = 99
T = 5  # tokens per image
HIDDEN = 3


def _rows(seed: int, batch: int, seq_length: int):
    """Rows of text ids with whole images (``T`` placeholders each) at random places."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50, (batch, seq_length), generator=generator)
    for row in tokens:
        start = 0
        while True:
            start += int(torch.randint(0, 9, (1,), generator=generator))
            if start + T > seq_length:
                break
            row[start : start + T] = IMAGE
            start += T
    return tokens


@pytest.mark.parametrize("cp, seed", [(2, 0), (2, 1), (3, 2), (4, 3)])
def test_the_share_equals_the_whole_row_cut_to_its_positions(cp, seed):
    batch, seq_length = 2, 48
    tokens = _rows(seed, batch, seq_length)
    num_images = int((tokens == IMAGE).sum()) // T
    table = torch.randn(100, HIDDEN, generator=torch.Generator().manual_seed(seed))
    image_tokens = torch.randn(num_images, T, HIDDEN, dtype=torch.float64)
    whole = merge_image_embeddings(
        table[tokens].transpose(0, 1).double(), image_tokens, tokens, image_token_id=IMAGE
    )
    covered = set()
    for rank in range(cp):
        positions = row_shard(seq_length, cp, rank).positions
        needed = local_image_tokens(tokens, positions, image_token_id=IMAGE, tokens_per_image=T)
        # Brute force: image i is needed iff one of its placeholders is at a local position.
        slot_image = torch.full_like(tokens, -1)
        slot_image[tokens == IMAGE] = torch.arange(num_images * T) // T
        expected = sorted(set(slot_image[:, positions].flatten().tolist()) - {-1})
        assert needed.images.tolist() == expected
        covered.update(expected)
        share = table[tokens[:, positions]].transpose(0, 1).double()
        flat = image_tokens[needed.images].reshape(-1, HIDDEN)
        share[needed.slots[:, 1], needed.slots[:, 0]] = flat[needed.rows]
        torch.testing.assert_close(share, whole[positions], rtol=0, atol=0)
    assert covered == set(range(num_images))


def test_placeholders_that_are_not_whole_images_are_refused():
    tokens = torch.tensor([[1, IMAGE, IMAGE, 2]])
    with pytest.raises(ValueError, match="not a multiple of the 5 tokens"):
        local_image_tokens(tokens, torch.arange(2), image_token_id=IMAGE, tokens_per_image=T)


def test_select_images_picks_packed_patch_rows_by_their_grids():
    grids = torch.tensor([[2, 3], [1, 1], [4, 2]])
    patches = torch.arange(15 * 2, dtype=torch.float32).reshape(15, 2)
    picked, picked_grids = select_images(patches, grids, torch.tensor([0, 2]))
    torch.testing.assert_close(picked, torch.cat([patches[:6], patches[7:]]))
    assert picked_grids.tolist() == [[2, 3], [4, 2]]
    images = torch.randn(3, 3, 4, 4)
    fixed, none = select_images(images, None, torch.tensor([1]))
    assert none is None and torch.equal(fixed, images[1:2])
