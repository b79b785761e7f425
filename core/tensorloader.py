"""The in-memory path: a small split held once as one uint8 tensor, augmented a whole batch at a time.

Why: on a 2-core CPU the per-image PIL → tensor pipeline costs more than the tutorial Net's own
step (benchmarks/bench_speed.py measures both paths side by side). Holding the split as uint8 and doing the
tutorials' augmentation (random crop from a zero- or reflect-padded image, horizontal flip) on whole
batches removes that cost. It supports exactly those steps; other specs use the DataLoader path.

``TensorLoader`` iterates ``(images float32 N×C×H×W normalised, labels int64)`` like a DataLoader,
with a per-epoch order that depends only on (seed, epoch) so a resumed run sees the same batches.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

# Steps the batched augmentation reproduces; a spec with anything else needs the per-image path.
SUPPORTED_STEPS = ("Resize", "RandomCrop", "RandomHorizontalFlip")
# Above this many bytes (uint8) a split is not held in memory by "auto" (e.g. 64k CIFAR images
# are 200 MB; 224 px ImageNet-size splits are not small any more).
AUTO_MAX_BYTES = 512 * 1024 * 1024


def batched_augment_params(spec: Sequence[dict], size: tuple[int, int]) -> dict | None:
    """Translate a transforms spec into batched-augmentation parameters, or None when it uses a
    step this path does not reproduce (or a crop size other than the image size)."""
    padding, flip_p, mode = 0, 0.0, "constant"
    for step in spec:
        name, params = step.get("name"), step.get("params", {}) or {}
        if name not in SUPPORTED_STEPS:
            return None
        if name == "Resize":  # the tensor is built at the model's size, so only a no-op Resize fits
            target = params.get("size")
            target = (target, target) if isinstance(target, int) else tuple(target or ())
            if target != tuple(size):
                return None
        elif name == "RandomCrop":
            crop = params.get("size", size[0])
            crop = (crop, crop) if isinstance(crop, int) else tuple(crop)
            pad = params.get("padding", 0) or 0
            mode = params.get("padding_mode", "constant")
            if crop != tuple(size) or not isinstance(pad, int) or mode not in ("constant", "reflect") \
                    or params.get("fill", 0) not in (0, None) or params.get("pad_if_needed") \
                    or (mode == "reflect" and pad >= min(size)):
                return None
            padding = pad
        elif name == "RandomHorizontalFlip":
            flip_p = float(params.get("p", 0.5))
    return {"padding": padding, "flip_p": flip_p, "padding_mode": mode}


def _reflect_index(n: int, pad: int) -> torch.Tensor:
    """Source rows (or columns) of a reflect-padded axis of length n: torch's "reflect" (the edge
    pixel is not repeated), as index arrays so uint8 tensors can be padded by gathering."""
    i = torch.arange(-pad, n + pad).abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


def pad_images(images: torch.Tensor, pad: int, mode: str = "constant") -> torch.Tensor:
    """N×C×H×W uint8 images padded by ``pad`` on every side, with zeros or by reflection."""
    if mode == "reflect":
        h, w = images.shape[2:]
        rows, cols = _reflect_index(h, pad).to(images.device), _reflect_index(w, pad).to(images.device)
        return images.index_select(2, rows).index_select(3, cols)
    return torch.nn.functional.pad(images, [pad] * 4)


class TensorLoader:
    """Batches from a uint8 tensor (N×C×H×W) on ``device``, normalised with ``mean``/``std``.

    train=True: a fresh permutation each epoch (seeded by ``set_epoch``), random crop from a
    zero- or reflect-padded copy (``padding_mode``) and random horizontal flip, on the whole batch.

    Distributed (``world_size`` > 1): ``batch_size`` is the global batch; every rank draws the same
    permutation and the crops and flips of the whole global batch, and keeps the rank-strided slice
    ``[rank::world_size]`` of each, so the ranks together train exactly the images, crops and flips
    one process would. ``len()`` and ``num_samples()`` stay the global counts.
    """

    def __init__(self, images: torch.Tensor, labels: Sequence[int], batch_size: int, train: bool,
                 mean: Sequence[float], std: Sequence[float], padding: int = 0, flip_p: float = 0.0,
                 seed: int = 0, device: str | torch.device = "cpu", padding_mode: str = "constant",
                 rank: int = 0, world_size: int = 1):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("TensorLoader needs a uint8 tensor shaped N×C×H×W")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = torch.as_tensor(list(labels), dtype=torch.int64, device=self.device)
        self.batch_size = int(batch_size)
        self.train = train
        self.padding = int(padding) if train else 0
        self.flip_p = float(flip_p) if train else 0.0
        self.seed = seed
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0
        self.skip_batches = 0
        c = images.shape[1]
        self.mean = torch.tensor(list(mean)[:c] if len(mean) >= c else list(mean) * c,
                                 device=self.device).view(1, c, 1, 1) * 255.0
        self.std = torch.tensor(list(std)[:c] if len(std) >= c else list(std) * c,
                                device=self.device).view(1, c, 1, 1) * 255.0
        if self.padding:  # pad once, not per batch
            self.padded = pad_images(self.images, self.padding, padding_mode)
        self.dataset = self  # DataLoader-like attribute some callers read (len(loader.dataset))

    def __len__(self) -> int:  # batches per epoch
        return (len(self.labels) + self.batch_size - 1) // self.batch_size

    def num_samples(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Fix the order and augmentation of ``epoch``; skip its first batches (resume mid-epoch)."""
        self.epoch, self.skip_batches = epoch, skip_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(n, generator=gen) if self.train else torch.arange(n)
        h, w = self.images.shape[2:]
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            # Draw this batch's random numbers even for skipped batches, so batch k of an epoch is
            # the same whether or not the epoch was resumed.
            if self.padding:
                oy = torch.randint(0, 2 * self.padding + 1, (len(idx),), generator=gen)
                ox = torch.randint(0, 2 * self.padding + 1, (len(idx),), generator=gen)
            if self.flip_p:
                flip = torch.rand(len(idx), generator=gen) < self.flip_p
            if b < self.skip_batches:
                continue
            if self.world_size > 1:   # this rank's share of the global batch, with its draws
                share = slice(self.rank, None, self.world_size)
                idx = idx[share]
                if self.padding:
                    oy, ox = oy[share], ox[share]
                if self.flip_p:
                    flip = flip[share]
            idx_d = idx.to(self.device)
            # Crop and flip as two gathers (rows, then columns) on the selected images: the same
            # pixels as indexing with four broadcast index tensors, several times cheaper, and
            # few, large ops (each small parallel op costs a lot on a busy 2-core machine).
            x = (self.padded if self.padding else self.images).index_select(0, idx_d)
            c = x.shape[1]
            if self.padding:
                rows = (oy.view(-1, 1, 1, 1) + torch.arange(h).view(1, 1, h, 1)).to(self.device)
                x = x.gather(2, rows.expand(-1, c, h, x.shape[3]))
            if self.padding or self.flip_p:
                x0 = ox.view(-1, 1, 1, 1) if self.padding else torch.zeros(len(idx), 1, 1, 1, dtype=torch.int64)
                across = torch.arange(w).view(1, 1, 1, w)
                if self.flip_p:   # a flipped image reads its crop's columns right to left
                    across = torch.where(flip.view(-1, 1, 1, 1), (w - 1) - across, across)
                x = x.gather(3, (x0 + across).to(self.device).expand(-1, c, h, w))
            x = x.float().sub_(self.mean).div_(self.std)
            yield x, self.labels[idx_d]
        self.skip_batches = 0
