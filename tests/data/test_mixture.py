"""Mixture schedule: exact shares per block, and source indices that a brute force agrees with."""

import pytest

from mm1_megatron.data.pipeline.mixture import MixtureSchedule, block_counts


@pytest.mark.parametrize(
    "weights, expected",
    [
        (
            {"interleaved": 0.45, "caption": 0.45, "text": 0.10},
            {
                "caption": 450,
                "interleaved": 450,
                "text": 100,
                "conversation": 0,
                "preference": 0,
                "video": 0,
            },
        ),
        (
            {"caption": 1, "text": 2},
            {
                "caption": 333,
                "interleaved": 0,
                "text": 667,
                "conversation": 0,
                "preference": 0,
                "video": 0,
            },
        ),
        (
            {"caption": 1, "interleaved": 1, "text": 1},
            {
                "caption": 334,
                "interleaved": 333,
                "text": 333,
                "conversation": 0,
                "preference": 0,
                "video": 0,
            },
        ),
    ],
)
def test_block_counts_by_largest_remainder(weights, expected):
    total = sum(weights.values())
    assert block_counts({k: v / total for k, v in weights.items()}, 1000) == expected


def test_source_index_counts_earlier_sequences_of_the_same_source():
    schedule = MixtureSchedule(
        {"caption": 0.45, "interleaved": 0.45, "text": 0.1}, seed=3, block=50
    )
    seen = {"caption": 0, "interleaved": 0, "text": 0}
    for g in range(50 * 7 + 13):  # brute force over whole blocks and a partial one
        name, index = schedule.locate(g)
        assert index == seen[name]
        seen[name] += 1
    # Random access (a fresh schedule, blocks out of order) gives the same answers.
    other = MixtureSchedule({"caption": 0.45, "interleaved": 0.45, "text": 0.1}, seed=3, block=50)
    assert [other.locate(g) for g in (370, 3, 200, 49, 50)] == [
        schedule.locate(g) for g in (370, 3, 200, 49, 50)
    ]


def test_order_inside_blocks_depends_on_the_seed():
    a = [MixtureSchedule({"caption": 1, "text": 1}, seed=0).source_of(g) for g in range(200)]
    b = [MixtureSchedule({"caption": 1, "text": 1}, seed=1).source_of(g) for g in range(200)]
    assert a != b and sorted(a) != a
