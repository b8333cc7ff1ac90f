import pytest
import torch
from transformers.models.t5.modeling_t5 import T5Attention

from vivace.model.positions import distance_bias_table, t5_relative_bucket


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 32), (16, 64), (64, 512)])
def test_bucket_matches_transformers_for_every_distance(num_buckets: int, max_distance: int) -> None:
    distance = torch.arange(0, 4 * max_distance + 100)
    ours = t5_relative_bucket(distance, num_buckets, max_distance)
    # transformers takes memory_position - query_position, i.e. the negated distance
    theirs = T5Attention._relative_position_bucket(
        -distance, bidirectional=False, num_buckets=num_buckets, max_distance=max_distance
    )
    assert torch.equal(ours, theirs)


def test_distance_table_saturates_like_buckets() -> None:
    bias = torch.randn(32, 4)
    table = distance_bias_table(bias, 128)
    for d in [0, 1, 15, 16, 17, 100, 127, 128, 129, 5000]:
        expected = bias[t5_relative_bucket(torch.tensor([d]), 32, 128)[0]]
        assert torch.equal(table[:, min(d, 128)], expected)
