"""Training batches as a pure function of (seed, iteration), so that a resumed run sees exactly the
batches it would have seen; optionally grouped to waste fewer padded pixels.

A batch is zero-padded to its largest image (:func:`istr_viz.data.coco.collate`), and the
backbone pays for every padded pixel: a portrait image beside a landscape one pads both to about
a square of the longer side. With ``groups`` (e.g. :func:`orientation_groups`: landscape or
square against portrait) a batch never mixes groups, as detectron2's aspect-ratio grouping does.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Sampler

from istr_viz.data.coco import CocoDataset
from istr_viz.errors import ConfigError


def orientation_groups(annotations) -> list[int]:
    """Per image of ``annotations`` (:class:`~istr_viz.data.coco.CocoAnnotations`, in its image
    order): 1 for portrait (height > width, as the file's entry says), 0 otherwise."""
    return [int(annotations.image_info(i)["height"] > annotations.image_info(i)["width"])
            for i in annotations.image_ids]


def padding_options(data, annotations) -> dict:
    """``groups`` for :class:`IterationBatchSampler` from a :class:`~istr_viz.config.DataConfig`
    (``group_by_orientation``) and the training set's annotations."""
    return {"groups": orientation_groups(annotations) if data.group_by_orientation else None}


class IterationBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches as a pure function of (seed, iteration): resuming at iteration i is exact.

    Epoch e shuffles the data set with a generator seeded by (seed, e); the global batch of
    iteration i is a contiguous slice of that permutation (last partial batch dropped), and each
    process takes its own ``batch_size`` part of it. Each item is ``(index, sample_seed)``; the
    sample seed drives that sample's augmentation, whatever the number of workers.

    With ``groups`` (one int per sample) holding more than one value, the epoch's permutation is
    split by group (order kept), each group cut into global batches (each group's last partial
    batch dropped), and the batches shuffled, seeded by (seed, e). With ``min_sizes`` every item
    is ``(index, sample_seed, min_size)``, the size drawn once per global batch, seeded by (seed,
    iteration), so that all processes resize alike.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, start_iter: int,
                 max_iters: int, rank: int = 0, world_size: int = 1,
                 groups: list[int] | None = None):
        self.global_batch = batch_size * world_size
        if num_samples < self.global_batch:
            raise ConfigError(f"the training set has {num_samples} images, fewer than one batch "
                              f"({self.global_batch}); lower train.batch_size")
        if groups is not None and len(groups) != num_samples:
            raise ValueError(f"groups has {len(groups)} entries for {num_samples} samples")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.start_iter, self.max_iters, self.rank = start_iter, max_iters, rank
        self.groups = torch.as_tensor(groups) if groups is not None and len(set(groups)) > 1 \
            else None
        if self.groups is None:
            self.iters_per_epoch = num_samples // self.global_batch
        else:
            counts = torch.bincount(self.groups)
            self.iters_per_epoch = int((counts // self.global_batch).sum())
            if self.iters_per_epoch == 0:  # no group fills a batch: mixing is the only way
                self.groups = None
                self.iters_per_epoch = num_samples // self.global_batch
        self._epoch, self._batches, self._perm = -1, None, None

    def _epoch_order(self, epoch: int) -> None:
        """This epoch's permutation, or with groups its list of global batches."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        self._perm = torch.randperm(self.num_samples, generator=g)
        if self.groups is not None:
            batches = []
            for group in torch.unique(self.groups):
                members = self._perm[self.groups[self._perm] == group]
                full = len(members) // self.global_batch * self.global_batch
                batches += list(members[:full].view(-1, self.global_batch))
            order = torch.randperm(len(batches), generator=g)
            self._batches = [batches[int(k)] for k in order]
        self._epoch = epoch

    def batch_for(self, iteration: int) -> list[tuple[int, int]]:
        epoch, pos = divmod(iteration, self.iters_per_epoch)
        if epoch != self._epoch:
            self._epoch_order(epoch)
        if self._batches is not None:
            global_batch = self._batches[pos]
        else:
            global_batch = self._perm[pos * self.global_batch:(pos + 1) * self.global_batch]
        start = self.rank * self.batch_size
        idx = global_batch[start:start + self.batch_size].tolist()
        return [(i, (self.seed * 7_919 + epoch) * 1_000_003 + i) for i in idx]

    def __iter__(self):
        for it in range(self.start_iter, self.max_iters):
            yield self.batch_for(it)

    def __len__(self) -> int:
        return max(0, self.max_iters - self.start_iter)


class SeededDataset(Dataset):
    """Wraps a :class:`CocoDataset` so that ``ds[(index, seed)]`` augments with its own generator."""

    def __init__(self, dataset: CocoDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        return self.dataset.get(index, generator=torch.Generator().manual_seed(seed))
