"""DataLoaders: the worker rule, pinned memory only for CUDA, seeded shuffling of the train split."""
from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from core.datasets import LabDataset
from core.errors import ConfigError, DataError

MAX_TUTORIAL_WORKERS = 8
# At or below this many cores "auto" means 0 workers: worker processes compete with the main
# process for the same cores and add IPC per batch, so on so few cores 0 workers is faster.
FEW_CORES = 2


def tutorial_num_workers(batch_size: int) -> int:
    """The tutorials' rule: min(CPU count, batch size, 8)."""
    return max(0, min(os.cpu_count() or 1, int(batch_size), MAX_TUTORIAL_WORKERS))


def resolve_num_workers(requested: int | str, batch_size: int) -> int:
    """An int (0 allowed) is used as is; "auto" is the tutorial rule, but 0 on machines with ≤ 2 cores."""
    if isinstance(requested, str) and requested.strip().isdigit():
        requested = int(requested.strip())
    if isinstance(requested, bool):
        raise ConfigError(f"num_workers must be an integer ≥ 0 or 'auto', got {requested!r}.")
    if isinstance(requested, int):
        if requested < 0:
            raise ConfigError(f"num_workers must be ≥ 0 or 'auto', got {requested}.")
        return requested
    if isinstance(requested, str) and requested.strip().lower() == "auto":
        if (os.cpu_count() or 1) <= FEW_CORES:
            return 0
        return tutorial_num_workers(batch_size)
    raise ConfigError(f"num_workers must be an integer ≥ 0 or 'auto', got {requested!r}.")


class TransformedSubset(Dataset):
    """``ds`` restricted to ``indices``, each image passed through ``transform``: item k → (tensor, label)."""

    def __init__(self, ds: LabDataset, indices: Sequence[int], transform: Callable | None):
        self.ds = ds
        self.indices = [int(i) for i in indices]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k):
        """Item ``k``, or ``(k, seed)`` from a training sampler: the image's augmentation is then drawn
        from a generator seeded by (the epoch's seed, the image's index) only, so it is the same in
        any worker, in any process of a distributed run, and after a resume."""
        k, seed = k if isinstance(k, tuple) else (k, None)
        i = self.indices[k]
        image = self.ds.load_image(i)
        if self.transform is not None:
            if seed is None:
                image = self.transform(image)
            else:
                with torch.random.fork_rng(devices=[]):   # the caller's RNG is left as it was
                    torch.manual_seed(sample_seed(seed, i))
                    image = self.transform(image)
        return image, self.ds.targets[i]


def sample_seed(epoch_seed: int, index: int) -> int:
    """The seed of one image's augmentation in one epoch (``index``: its index in the dataset)."""
    return (int(epoch_seed) * 1_000_003 + int(index)) % (2**63 - 1)


class SkippingBatchSampler(BatchSampler):
    """A BatchSampler whose next pass can start after its first ``skip`` batches (resume mid-epoch).

    The skipped batches are still drawn, so the remaining ones are exactly those of an uninterrupted
    epoch; only their indices are produced, no image is loaded for them. ``skip`` applies once.

    Distributed (``world_size`` > 1): ``batch_size`` is the global batch, and this rank gets the
    rank-strided slice ``batch[rank::world_size]`` of each global batch of the one seeded
    permutation, so the ranks together train exactly the batches one process would. With
    ``epoch_seed`` set (the trainer sets it each epoch) it yields ``(index, epoch_seed)`` pairs,
    which give each image an augmentation of its own (TransformedSubset).
    """

    def __init__(self, sampler, batch_size: int, drop_last: bool = False, rank: int = 0, world_size: int = 1):
        super().__init__(sampler, batch_size, drop_last)
        self.skip = 0
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch_seed: int | None = None

    def __iter__(self):
        skip, self.skip = self.skip, 0
        for k, batch in enumerate(super().__iter__()):
            if k >= skip:
                batch = batch[self.rank::self.world_size]
                yield batch if self.epoch_seed is None else [(i, self.epoch_seed) for i in batch]


def _is_cuda(device: str | torch.device) -> bool:
    try:
        return torch.device(device).type == "cuda"
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"Unknown device {device!r} ({e}). Use 'cpu', 'cuda' or 'cuda:N'.") from None


def make_loader(ds: LabDataset, indices: Sequence[int], transform: Callable | None, batch_size: int, train: bool,
                num_workers: int | str = "auto", device: str | torch.device = "cpu", seed: int = 0,
                rank: int = 0, world_size: int = 1) -> DataLoader:
    """A DataLoader over ``ds[indices]``: shuffled (seeded) only when ``train``; pin_memory only for CUDA;
    persistent workers when there are any; the last partial batch is kept (drop_last=False).

    The generator also seeds the workers. Once ``set_epoch`` has given the loader an epoch seed,
    each training image's augmentation depends only on (that seed, the image), whatever the number
    of workers or processes; before, it draws from the process's (or worker's) torch RNG.
    ``rank``/``world_size``: this process's share of each global batch (SkippingBatchSampler).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer ≥ 1, got {batch_size!r}.")
    if len(indices) == 0:
        raise DataError(f"No images to load from {ds.name}: the {'train' if train else 'evaluation'} split is "
                        f"empty. Change the split fractions or add images.")
    workers = resolve_num_workers(num_workers, batch_size)
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    subset = TransformedSubset(ds, indices, transform)
    # = DataLoader(shuffle=train, batch_size, drop_last=False), with a batch sampler set_epoch can skip
    sampler = RandomSampler(subset, generator=generator) if train else SequentialSampler(subset)
    return DataLoader(
        subset,
        batch_sampler=SkippingBatchSampler(sampler, batch_size, drop_last=False, rank=rank, world_size=world_size),
        generator=generator,
        num_workers=workers,
        pin_memory=_is_cuda(device),
        persistent_workers=workers > 0,
    )


def set_epoch(loader: DataLoader, seed: int, skip_batches: int = 0) -> None:
    """Make the loader's next pass reproducible: reseed its generator (shuffle order, worker seeds)
    with ``seed`` (the trainer passes one per epoch), seed each image's augmentation by (``seed``,
    the image) and skip its first ``skip_batches`` batches. The per-image seeds travel with the
    indices, so persistent workers (seeded once, at their start) augment reproducibly too."""
    if loader.generator is not None:
        loader.generator.manual_seed(int(seed))
    sampler = loader.batch_sampler
    if isinstance(sampler, SkippingBatchSampler):
        sampler.epoch_seed = int(seed)
    if skip_batches:
        if not isinstance(sampler, SkippingBatchSampler):
            raise ConfigError("This loader cannot skip batches: build it with make_loader.")
        sampler.skip = int(skip_batches)
