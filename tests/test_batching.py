"""Training batches (istr_viz.data.batching): a pure function of (seed, iteration), grouped by
orientation so that a batch never pads a portrait image beside a landscape one."""

from __future__ import annotations

import json

import pytest

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


def test_one_group_gives_the_batches_of_no_grouping():
    plain = IterationBatchSampler(30, 4, 3, 0, 20)
    assert list(IterationBatchSampler(30, 4, 3, 0, 20, groups=[0] * 30)) == list(plain)
    # no group fills a batch: they mix, rather than an epoch of no batch
    tiny = IterationBatchSampler(6, 2, 3, 0, 4, world_size=2, groups=[0, 1, 0, 1, 1, 0])
    assert tiny.groups is None and tiny.iters_per_epoch == 1
    with pytest.raises(ValueError, match="groups has 3 entries for 30 samples"):
        IterationBatchSampler(30, 4, 3, 0, 20, groups=[0, 1, 0])


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
