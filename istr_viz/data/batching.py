"""Training batches as a pure function of (seed, iteration), so that a resumed run sees exactly the
batches it would have seen; optionally grouped to waste fewer padded pixels.

A batch is zero-padded to its largest image (:func:`istr_viz.data.coco.collate`), and the
backbone pays for every padded pixel: a portrait image beside a landscape one pads both to about
a square of the longer side. With ``groups`` (e.g. :func:`orientation_groups`: landscape or
square against portrait) a batch keeps to one group, like detectron2's aspect-ratio grouping; only
each epoch's remainders of the groups (fewer than a batch each) are pooled into mixed batches.
"""

from __future__ import annotations

import numbers

import torch
from torch.utils.data import Dataset, Sampler

from istr_viz.data.coco import CocoDataset
from istr_viz.errors import ConfigError


def orientation_groups(annotations) -> list[int]:
    """Per image of ``annotations`` (:class:`~istr_viz.data.coco.CocoAnnotations`, in its image
    order): 1 for portrait (height > width, as the file's entry says), 0 otherwise."""
    infos = (annotations.image_info(i) for i in annotations.image_ids)
    return [int(info["height"] > info["width"]) for info in infos]


def padding_options(data, annotations) -> dict:
    """The keyword arguments of :class:`IterationBatchSampler` that cut padding (``groups``),
    from a :class:`~istr_viz.config.DataConfig` (``group_by_orientation``) and the training set's
    annotations."""
    return {"groups": orientation_groups(annotations) if data.group_by_orientation else None}


class IterationBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches as a pure function of (seed, iteration): resuming at iteration i is exact.

    Epoch e shuffles the data set with a generator seeded by (seed, e); the global batch of
    iteration i is a contiguous slice of that permutation (last partial batch dropped), and each
    process takes its own ``batch_size`` part of it. Each item is ``(index, sample_seed)``; the
    sample seed drives that sample's augmentation, whatever the number of workers.

    With ``groups`` (a non-negative int per sample) holding more than one value, the epoch's
    permutation is split by group (order kept) and each group cut into global batches; what is
    left of each group (fewer than a batch; a whole group smaller than a batch) is pooled, in
    permutation order, into mixed batches, so no image is left out of every epoch. The batches
    are then shuffled, seeded by (seed, e); the last partial batch is dropped. Batches per epoch
    do not change from epoch to epoch, and every process computes the same ones.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, start_iter: int,
                 max_iters: int, rank: int = 0, world_size: int = 1,
                 groups: list[int] | None = None):
        self.global_batch = batch_size * world_size
        if num_samples < self.global_batch:
            raise ConfigError(f"the training set has {num_samples} images, fewer than one batch "
                              f"({self.global_batch}); lower train.batch_size")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.start_iter, self.max_iters, self.rank = start_iter, max_iters, rank
        self.groups = _checked_groups(groups, num_samples)
        self.iters_per_epoch = num_samples // self.global_batch
        self._epoch, self._batches, self._perm = -1, None, None

    def _epoch_order(self, epoch: int) -> None:
        """This epoch's permutation, and with groups its list of global batches."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        self._perm = torch.randperm(self.num_samples, generator=g)
        if self.groups is not None:
            batches, left = [], []
            for group in torch.unique(self.groups):
                members = self._perm[self.groups[self._perm] == group]
                full = len(members) // self.global_batch * self.global_batch
                batches += list(members[:full].view(-1, self.global_batch))
                left.append(members[full:])
            left = torch.cat(left)
            position = torch.empty_like(self._perm)
            position[self._perm] = torch.arange(self.num_samples)
            left = left[position[left].argsort()]  # back in the permutation's order
            full = len(left) // self.global_batch * self.global_batch
            batches += list(left[:full].view(-1, self.global_batch))
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


def _checked_groups(groups, num_samples: int) -> torch.Tensor | None:
    """``groups`` as a (num_samples,) int64 tensor, or None when there is at most one group.
    Raises ValueError unless it is one non-negative integer per sample."""
    if groups is None:
        return None
    values = list(groups.tolist() if torch.is_tensor(groups) else groups)
    if len(values) != num_samples:
        raise ValueError(f"groups has {len(values)} entries for {num_samples} samples")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise ValueError(f"groups must be non-negative integers, one per sample; got {v!r}")
    values = [int(v) for v in values]
    return torch.tensor(values, dtype=torch.int64) if len(set(values)) > 1 else None


class SeededDataset(Dataset):
    """Wraps a :class:`CocoDataset` so that ``ds[(index, seed)]`` augments with its own generator."""

    def __init__(self, dataset: CocoDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        return self.dataset.get(index, generator=torch.Generator().manual_seed(seed))
