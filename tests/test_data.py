"""Training batches: the same global batches for any number of ranks; the loss's token count."""
import pytest
import torch

from moe_peft_ds.data import IGNORE_INDEX, DataError, GlobalBatches, target_tokens


def epochs(sampler, n: int) -> list[list[int]]:
    return [batch for _ in range(n) for batch in sampler]


def test_ranks_together_see_the_batches_of_one_process_with_the_global_batch():
    one = epochs(GlobalBatches(23, 6, seed=3), 3)
    ranks = [epochs(GlobalBatches(23, 3, rank=r, world=2, seed=3), 3) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == one
    assert len(one) == 3 * 3 and all(len(b) == 6 for b in one)  # 23 // 6 batches an epoch; the 5 left over dropped
    assert len(set(one[0] + one[1] + one[2])) == 18  # no sample twice within an epoch


def test_each_epoch_is_a_new_shuffle_and_the_seed_decides_it():
    a, b = epochs(GlobalBatches(20, 4, seed=0), 2), epochs(GlobalBatches(20, 4, seed=0), 2)
    assert a == b
    assert a[:5] != a[5:]
    assert a != epochs(GlobalBatches(20, 4, seed=1), 2)


def test_fewer_samples_than_one_global_batch_is_an_error():
    with pytest.raises(DataError, match="fewer than one global batch"):
        GlobalBatches(7, 4, rank=0, world=2)


def test_target_tokens_counts_the_shifted_labels_that_are_not_ignored():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6, IGNORE_INDEX], [1, 2, 3, 4, 5]])
    assert target_tokens({"labels": labels}) == 2 + 4  # the first label of a row is never predicted
