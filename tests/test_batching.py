"""Training batches (istr_viz.data.batching): a pure function of (seed, iteration), grouped by
orientation so that a batch never pads a portrait image beside a landscape one."""

from __future__ import annotations

import json

import pytest
import torch

from istr_viz.config import DataConfig
from istr_viz.data.batching import IterationBatchSampler, orientation_groups, padding_options
from istr_viz.data.coco import load_annotations

# 30 images, a third portrait, in an order that mixes the two
GROUPS = [int(i % 3 == 1) for i in range(30)]


def _indices(sampler: IterationBatchSampler, it: int) -> list[int]:
    return [i for i, _ in sampler.batch_for(it)]


def test_a_global_batch_never_mixes_groups_and_the_processes_split_it():
    ranks = [IterationBatchSampler(30, 2, 5, 0, 40, rank=r, world_size=2, groups=GROUPS)
             for r in (0, 1)]
    assert ranks[0].iters_per_epoch == 10 // 4 + 20 // 4  # each group's partial batch dropped
    seen_in_epoch = []
    for it in range(40):
        a, b = _indices(ranks[0], it), _indices(ranks[1], it)
        assert len(a) == len(b) == 2 and not set(a) & set(b)
        assert len({GROUPS[i] for i in a + b}) == 1
        if it < ranks[0].iters_per_epoch:
            seen_in_epoch += a + b
    assert len(seen_in_epoch) == len(set(seen_in_epoch)) == 28  # no image twice in an epoch
    kinds = [GROUPS[_indices(ranks[0], it)[0]] for it in range(7)]
    assert kinds != sorted(kinds) and kinds != sorted(kinds, reverse=True)  # batches shuffled


def test_grouped_batches_resume_exactly_and_change_with_the_seed():
    full = IterationBatchSampler(30, 4, 1, 0, 25, groups=GROUPS)
    resumed = IterationBatchSampler(30, 4, 1, 11, 25, groups=GROUPS)
    assert list(full)[11:] == list(resumed)
    other = IterationBatchSampler(30, 4, 2, 0, 25, groups=GROUPS)
    assert list(other) != list(full)


def test_ungrouped_batches_are_those_of_before_grouping_existed():
    """The sampler of ec62f9e (in istr_viz.engine then), 10 images, 2 a process, 2 processes,
    seed 3: square-image data sets (one group) train on exactly the batches they did."""
    before = {0: [[(4, 23757071275), (5, 23757071276)], [(2, 23757071273), (8, 23757071279)],
                  [(1, 23758071275), (9, 23758071283)]],
              1: [[(0, 23757071271), (1, 23757071272)], [(3, 23757071274), (6, 23757071277)],
                  [(5, 23758071279), (6, 23758071280)]]}
    for groups in (None, [0] * 10, [2] * 10):
        for rank in (0, 1):
            sampler = IterationBatchSampler(10, 2, 3, 0, 3, rank, 2, groups=groups)
            assert [sampler.batch_for(it) for it in range(3)] == before[rank]


def test_what_is_left_of_the_groups_is_pooled_so_no_image_is_never_seen():
    groups = [0] * 10 + [1] * 3  # the portrait group is smaller than one batch
    sampler = IterationBatchSampler(13, 4, 0, 0, 9, groups=groups)
    assert sampler.iters_per_epoch == 3
    per_epoch = [[i for it in range(3 * e, 3 * e + 3) for i, _ in sampler.batch_for(it)]
                 for e in range(3)]
    for epoch in per_epoch:
        assert len(set(epoch)) == 12 and len(epoch) == 12  # one image left over an epoch
        mixed = [epoch[k:k + 4] for k in range(0, 12, 4)
                 if len({groups[i] for i in epoch[k:k + 4]}) > 1]
        assert len(mixed) <= 1  # only the pooled remainders mix
    assert {10, 11, 12} <= set().union(*per_epoch)


def test_groups_must_be_one_non_negative_integer_per_sample():
    with pytest.raises(ValueError, match="groups has 3 entries for 30 samples"):
        IterationBatchSampler(30, 4, 3, 0, 20, groups=[0, 1, 0])
    for bad in (True, -1, "a", 0.5):
        with pytest.raises(ValueError, match="groups must be non-negative integers"):
            IterationBatchSampler(4, 2, 3, 0, 2, groups=[0, 1, 0, bad])
    one = IterationBatchSampler(30, 4, 3, 0, 20, groups=torch.zeros(30, dtype=torch.int64))
    assert one.groups is None  # a tensor of one value is one group, as a list is


def test_orientation_groups_follow_the_files_image_entries(tmp_path):
    sizes = {7: (100, 200), 3: (300, 120), 9: (64, 64)}  # landscape, portrait, square
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i}.png", "height": h, "width": w}
                   for i, (h, w) in sizes.items()],
        "annotations": [], "categories": [{"id": 1, "name": "thing"}]}))
    ann = load_annotations(ann_file)
    expected = [int(sizes[i][0] > sizes[i][1]) for i in ann.image_ids]
    assert orientation_groups(ann) == expected and sorted(expected) == [0, 0, 1]
    assert padding_options(DataConfig(), ann) == {"groups": expected}
    assert padding_options(DataConfig(group_by_orientation=False), ann) == {"groups": None}
