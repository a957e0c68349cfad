"""Batches for training and evaluation, identical on every run with the same seed (so that a run can resume).

Every random choice is derived from the run seed and a position, never from a generator that has to be carried
along: the sample order of epoch ``e`` from (seed, e), the augmentation of the sample at position ``j`` of step
``s``'s global batch from its key (seed, e, s, j) (:mod:`vitlab.data.sample_random`; each batch carries its samples'
keys for the draws made later, such as patch dropout), a folder image's augmentation from (seed, e, index) (and
which showing it is, with repeated augmentation: :func:`epoch_order`). Resuming at step ``s`` therefore only needs
the step number, and no draw depends on the rank: the same global batch gives the same augmented images on any
number of processes.

Global batch ``B`` per optimiser step is split into ``world_size x accum_steps`` micro-batches: step ``s`` of an
epoch uses the samples ``perm[s*B:(s+1)*B]`` whatever the number of processes, and rank ``r``'s micro-batch ``a`` is
chunk ``a * world_size + r`` of it. Evaluation gives rank ``r`` the samples ``r, r + W, r + 2W, ...`` with no padding,
so that summed counts are exact.

In-memory data sets (:class:`~vitlab.data.arrays.ArrayDataset`) are batched straight from the uint8 tensor and
augmented a whole batch at a time (:mod:`vitlab.data.batch_transforms`), without DataLoader workers; image folders
and tar shards go through a ``torch.utils.data.DataLoader`` with per-image torchvision transforms.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from ..errors import InvalidValueError
from ..preprocessing import Preprocessing
from . import batch_transforms as BT
from . import sample_random as SR
from .arrays import ArrayDataset
from .folder import ImageFolderDataset, collate_skipping
from .shards import ShardDataset
from .transforms import POLICIES, train_transform


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence), the same on every machine and run."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFFFFFF for v in values]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


def epoch_order(size: int, seed: int, epoch: int, repeats: int = 1,
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples of ``epoch`` in order and which showing of its sample each position is: ``(indices, copies)``,
    int64 of length ``size``. Without repetition a permutation seeded by (seed, epoch) and all copies 0. With
    ``repeats`` = r > 1 (repeated augmentation, Hoffer et al. 2020; DeiT uses 3), the first ``ceil(size / r)`` of
    that permutation, each shown r times in a row (so the copies share a global batch, where each gets its own
    augmentation from its position), cut to ``size``: the epoch keeps its length and sees a third of the images.
    ``weights`` (size,): the samples are drawn with replacement in proportion to them instead of permuted (balanced
    sampling, :mod:`vitlab.data.balance`); a sample drawn again is a later showing (its copy counts up)."""
    generator = torch.Generator().manual_seed(mix_seed(seed, epoch))
    unique = -(-size // repeats)
    if weights is not None:
        drawn = torch.multinomial(weights, unique, replacement=True, generator=generator)
        indices = drawn.repeat_interleave(repeats)[:size]
        return indices, _showings(indices)
    perm = torch.randperm(size, generator=generator)
    if repeats <= 1:
        return perm, torch.zeros(size, dtype=torch.int64)
    indices = perm[:unique].repeat_interleave(repeats)[:size]
    copies = torch.arange(repeats).repeat(unique)[:size]
    return indices, copies


def _showings(indices: torch.Tensor) -> torch.Tensor:
    """For each position, how many times its index came before it (0 for the first showing)."""
    order = torch.argsort(indices, stable=True)
    ranked = indices[order]
    positions = torch.arange(len(indices))
    first = torch.ones(len(indices), dtype=torch.bool)
    first[1:] = ranked[1:] != ranked[:-1]
    group_start = torch.cummax(torch.where(first, positions, 0), dim=0).values
    copies = torch.empty_like(indices)
    copies[order] = positions - group_start
    return copies


@dataclass(frozen=True)
class Augment:
    """Training augmentation settings shared by the in-memory and the per-image paths.

    ``policy``: one of ``inception`` (paper), ``crop``, ``shift``, ``flip``, ``resize``, ``none``; ``crop_scale``
    the area range of the random crop; ``max_shift`` the translation in pixels for ``shift``; ``randaugment``
    (num_ops, magnitude) or None; ``erasing`` the probability of random erasing (after normalising)."""

    policy: str = "inception"
    crop_scale: tuple[float, float] = (0.05, 1.0)
    flip: bool = True
    max_shift: int = 2
    randaugment: tuple[int, int] | None = None
    erasing: float = 0.0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise InvalidValueError(f"augmentation policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")


class Batch:
    """A micro-batch: float images (b, C, H, W), int64 labels (b,), the reasons for samples skipped from it, and for
    training batches the samples' keys (b,) (:func:`step_keys`) for the draws made after loading (patch dropout)."""

    __slots__ = ("images", "labels", "skipped", "keys")

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, skipped: list[str] | None = None,
                 keys: torch.Tensor | None = None):
        self.images, self.labels, self.skipped, self.keys = images, labels, skipped or [], keys


def step_keys(seed: int, epoch: int, step: int, start: int, count: int) -> torch.Tensor:
    """The keys of the samples at positions ``start .. start + count - 1`` of step ``step``'s global batch in
    ``epoch``: what every per-sample draw of training is made from, whichever process holds the sample."""
    return SR.sample_keys(mix_seed(seed, epoch, step, 6), torch.arange(start, start + count))


# ----- in-memory data
def augment_batch(images: torch.Tensor, size: tuple[int, int], aug: Augment, keys: torch.Tensor,
                  mean=(0.5,), std=(0.5,), interpolation: str = "bilinear") -> torch.Tensor:
    """uint8 (b, C, H, W) -> augmented, normalised float (b, C, *size), every draw from the sample's own key
    (``keys``: (b,), :func:`step_keys`); crops and resizes sample with ``interpolation``."""
    if aug.randaugment is not None:
        from torchvision.transforms import v2 as T

        ra = T.RandAugment(num_ops=aug.randaugment[0], magnitude=aug.randaugment[1])
        augmented = []
        with torch.random.fork_rng(devices=[]):  # RandAugment draws from the global generator: seeded per image
            for img, seed in zip(images, SR.keyed_seeds(keys, SR.RANDAUGMENT)):
                torch.manual_seed(seed)
                augmented.append(ra(img))
        images = torch.stack(augmented)
    x = BT.to_float(images, mean, std)
    if aug.policy in ("inception", "crop"):
        x = BT.random_resized_crop(x, size, scale=aug.crop_scale, flip=aug.flip, interpolation=interpolation,
                                   keys=keys)
    else:
        x = BT.resize(x, size, interpolation)
        if aug.flip and aug.policy in ("shift", "flip"):
            x = BT.random_flip(x, keys=keys)
        if aug.policy == "shift":
            x = BT.random_shift(x, aug.max_shift, fill=float((0.0 - mean[0]) / std[0]), keys=keys)
    return BT.random_erasing(x, aug.erasing, keys=keys)


# share of a GPU's free memory an in-memory training set may take to be kept there (its uint8 images)
DEVICE_DATA_SHARE = 0.25


def on_device(tensors: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """``tensors`` moved to a CUDA ``device`` once when together they take at most :data:`DEVICE_DATA_SHARE` of its
    free memory (batches are then gathered there, with no copy per step), else left where they are."""
    if device.type != "cuda":
        return tensors
    free, _ = torch.cuda.mem_get_info(device)
    if sum(t.numel() * t.element_size() for t in tensors) > DEVICE_DATA_SHARE * free:
        return tensors
    return tuple(t.to(device) for t in tensors)


class InMemoryTrainLoader:
    """Training micro-batches of an :class:`ArrayDataset`, augmented per batch.

    ``global_batch`` samples per optimiser step over all ranks and accumulation steps; the last partial step of an
    epoch is dropped. Iterate with :meth:`epoch` (optionally from a micro-batch index, for resuming). On a GPU the
    images and labels are kept on it (:func:`on_device`) and every copy is non-blocking, so that fetching a batch
    never waits for the device."""

    def __init__(self, dataset: ArrayDataset, global_batch: int, img_size: tuple[int, int], augment: Augment,
                 seed: int = 0, rank: int = 0, world_size: int = 1, accum_steps: int = 1,
                 mean=(0.5,), std=(0.5,), device: torch.device | str = "cpu", interpolation: str = "bilinear",
                 repeats: int = 1, weights: torch.Tensor | None = None):
        self.dataset, self.global_batch, self.img_size, self.augment = dataset, global_batch, img_size, augment
        self.repeats, self.weights = repeats, weights
        self.seed, self.rank, self.world_size, self.accum_steps = seed, rank, world_size, accum_steps
        self.mean, self.std, self.device = tuple(mean), tuple(std), torch.device(device)
        self.interpolation = interpolation
        self.micro_batch = check_batch_split(global_batch, world_size, accum_steps)
        self.steps_per_epoch = len(dataset) // global_batch
        if self.steps_per_epoch == 0:
            raise InvalidValueError(f"batch size {global_batch} is larger than the {len(dataset)} training samples")
        self.images, self.labels = on_device((dataset.images, dataset.labels), self.device)

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches this rank yields per epoch (steps x accumulation)."""
        return self.steps_per_epoch * self.accum_steps

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Micro-batches of ``epoch`` from micro-batch ``start`` on."""
        order, _ = epoch_order(len(self.dataset), self.seed, epoch, self.repeats,  # copies: told apart by their keys
                               self.weights)
        images, labels = self.images, self.labels
        for m in range(start, self.batches_per_epoch):
            step, acc = divmod(m, self.accum_steps)
            chunk = acc * self.world_size + self.rank
            lo = step * self.global_batch + chunk * self.micro_batch
            idx = order[lo: lo + self.micro_batch].to(images.device, non_blocking=True)
            keys = step_keys(self.seed, epoch, step, chunk * self.micro_batch, len(idx))
            x = images[idx].to(self.device, non_blocking=True)
            x = augment_batch(x, self.img_size, self.augment, keys, self.mean, self.std, self.interpolation)
            yield Batch(x, labels[idx].to(self.device, non_blocking=True), keys=keys.to(self.device, non_blocking=True))


def check_batch_split(global_batch: int, world_size: int, accum_steps: int) -> int:
    """The micro-batch size; the global batch must split evenly over ranks and accumulation steps."""
    parts = world_size * accum_steps
    if global_batch <= 0 or global_batch % parts:
        raise InvalidValueError(f"batch size {global_batch} does not split into {world_size} processes x {accum_steps} "
                         f"accumulation steps")
    return global_batch // parts


def in_memory_eval_batches(dataset: ArrayDataset, preprocessing: Preprocessing, batch_size: int = 500,
                           rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu"
                           ) -> Iterator[Batch]:
    """This rank's share of ``dataset`` (samples rank, rank + W, ...), normalised and resized as
    ``preprocessing`` says (its mean / std, interpolation and resize policy: ``squash`` to the model size, or
    ``crop``: the shorter side to ``size / crop_pct`` and the centre crop), in batches. The images are normalised
    first and resized as floats (no rounding to uint8 in between)."""
    indices = torch.arange(rank, len(dataset), world_size)
    size = tuple(preprocessing.img_size)
    for lo in range(0, len(indices), batch_size):
        idx = indices[lo: lo + batch_size]
        x = BT.to_float(dataset.images[idx].to(device), preprocessing.mean, preprocessing.std)
        if preprocessing.resize == "crop":
            x = BT.resize_center_crop(x, size, preprocessing.crop_pct, preprocessing.interpolation)
        elif tuple(x.shape[-2:]) != size:
            x = BT.resize(x, size, preprocessing.interpolation)
        yield Batch(x, dataset.labels[idx].to(device))


# ----- image folders and tar shards
@contextlib.contextmanager
def _sigint_deferred():
    """Hold back Ctrl-C while DataLoader workers are forked, and deliver it once they are all started.

    A SIGINT whose Python handler happens to run inside an at-fork callback (``logging`` registers one that every
    fork runs) raises KeyboardInterrupt where CPython can only print "Exception ignored" and go on: the interrupt
    was lost, and the run went on (about 1 try in 7 when Ctrl-C came during start-up). One raised half-way through
    the iterator's construction left a half-built iterator whose clean-up printed a traceback."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            if previous is signal.default_int_handler or previous is None:
                raise KeyboardInterrupt
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGINT)


def _workers_started(loader: DataLoader):
    """``iter(loader)``: its workers started with Ctrl-C held back until they all run (:func:`_sigint_deferred`)."""
    if not loader.num_workers:
        return iter(loader)
    with _sigint_deferred():
        return iter(loader)


def _interruptible_worker(worker_id: int) -> None:
    """In a worker: Ctrl-C as Python's default (the handler that held it back in the parent is not the worker's),
    and no traceback of its own when the main process goes away (:func:`_main_process_gone_quietly`)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.excepthook = _main_process_gone_quietly(sys.excepthook)


def _main_process_gone_quietly(report):
    """A worker's ``sys.excepthook``: a connection that breaks inside multiprocessing's resource sharer (the thread
    that hands the main process the file descriptors of the batches' shared memory) means the main process went
    away mid-handshake (Ctrl-C: about 1 try in 6 a few batches into a run). The main process says what happened;
    the worker prints nothing. Everything else goes to ``report``."""

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, (EOFError, ConnectionError)) and _raised_in_resource_sharer(tb):
            return
        report(exc_type, exc, tb)

    return hook


def _raised_in_resource_sharer(tb) -> bool:
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(os.path.join("multiprocessing", "resource_sharer.py")):
            return True
        tb = tb.tb_next
    return False


class _SampleSeed:
    """Picklable ``index -> seed`` for one epoch (sent to DataLoader workers); ``copy`` > 0: the seed of the sample's
    later showing with repeated augmentation."""

    def __init__(self, seed: int, epoch: int, copy: int = 0):
        self.seed, self.epoch, self.copy = seed, epoch, copy

    def __call__(self, index: int) -> int:
        if self.copy:
            return mix_seed(self.seed, self.epoch, index, self.copy, 2)
        return mix_seed(self.seed, self.epoch, index, 2)


class _Repeats(Dataset):
    """A map-style data set read with repeated augmentation: item ``copy * len(base) + i`` is sample ``i``,
    augmented with the draws of its ``copy``-th showing (each worker holds its own copy of this object and reads one
    item at a time, so setting the base's seed function per item is safe)."""

    def __init__(self, base: Dataset, seed: int, epoch: int):
        self.base, self.seed, self.epoch = base, seed, epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: int):
        copy, index = divmod(item, len(self.base))
        self.base.sample_seed = _SampleSeed(self.seed, self.epoch, copy)
        return self.base[index]


class _WorkerInit:
    """Seeds Python's, numpy's and torch's global generators in each worker from (seed, epoch, rank, worker), for
    any user transform that draws from them."""

    def __init__(self, seed: int, epoch: int, rank: int):
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __call__(self, worker_id: int) -> None:
        _interruptible_worker(worker_id)
        s = mix_seed(self.seed, self.epoch, self.rank, worker_id, 3)
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)


class _StepSampler(Sampler[int]):
    """Indices of this rank's micro-batches for one epoch, from micro-batch ``start`` on (see the module doc)."""

    def __init__(self, size: int, loader: FolderTrainLoader, epoch: int, start: int):
        self.size, self.loader, self.epoch, self.start = size, loader, epoch, start

    def __iter__(self):
        ld = self.loader
        indices, copies = epoch_order(self.size, ld.seed, self.epoch, ld.repeats, ld.weights)
        order = indices + copies * self.size  # a later showing of a sample: read through _Repeats
        for m in range(self.start, ld.batches_per_epoch):
            step, acc = divmod(m, ld.accum_steps)
            lo = step * ld.global_batch + (acc * ld.world_size + ld.rank) * ld.micro_batch
            yield from order[lo: lo + ld.micro_batch].tolist()

    def __len__(self) -> int:
        return (self.loader.batches_per_epoch - self.start) * self.loader.micro_batch


class FolderTrainLoader:
    """Training micro-batches from an :class:`ImageFolderDataset` or a :class:`ShardDataset` through DataLoader
    workers, same interface as :class:`InMemoryTrainLoader`. Skipped files are reported in ``Batch.skipped``."""

    def __init__(self, dataset: ImageFolderDataset | ShardDataset, global_batch: int, img_size: tuple[int, int],
                 augment: Augment, seed: int = 0, rank: int = 0, world_size: int = 1, accum_steps: int = 1,
                 mean=(0.5,), std=(0.5,), device: torch.device | str = "cpu", num_workers: int = 0,
                 interpolation: str = "bilinear", repeats: int = 1, weights: torch.Tensor | None = None):
        if repeats > 1 and isinstance(dataset, IterableDataset):
            raise InvalidValueError("repeated augmentation (aug_repeats) needs random access to the samples; tar "
                                    "shards and streamed sources are read in order", options=("aug_repeats",))
        if weights is not None and isinstance(dataset, IterableDataset):
            raise InvalidValueError("balanced sampling needs random access to the samples; tar shards and streamed "
                                    "sources are read in order", options=("sampling",))
        self.dataset, self.global_batch, self.seed, self.repeats = dataset, global_batch, seed, repeats
        self.weights = weights
        self.rank, self.world_size, self.accum_steps = rank, world_size, accum_steps
        self.device, self.num_workers = torch.device(device), num_workers
        self.micro_batch = check_batch_split(global_batch, world_size, accum_steps)
        self.steps_per_epoch = len(dataset) // global_batch
        if self.steps_per_epoch == 0:
            raise InvalidValueError(f"batch size {global_batch} is larger than the {len(dataset)} training samples")
        dataset.transform = train_transform(
            img_size, dataset.channels, augment.policy, augment.crop_scale, augment.flip, augment.max_shift,
            augment.randaugment, mean, std, interpolation, augment.erasing)

    @property
    def batches_per_epoch(self) -> int:
        return self.steps_per_epoch * self.accum_steps

    def _dataloader(self, epoch: int, start: int) -> DataLoader:
        common = dict(batch_size=self.micro_batch, num_workers=self.num_workers, collate_fn=collate_skipping,
                      worker_init_fn=_WorkerInit(self.seed, epoch, self.rank),
                      pin_memory=self.device.type == "cuda")
        if isinstance(self.dataset, IterableDataset):  # tar shards, a streamed Hugging Face source
            self.dataset.set_epoch(epoch)
            self.dataset.seed = self.seed
            if hasattr(self.dataset, "sample_seed"):  # a stream that seeds each row's augmentation by its row number
                self.dataset.sample_seed = _SampleSeed(self.seed, epoch)
            return DataLoader(self.dataset, **common)
        self.dataset.sample_seed = _SampleSeed(self.seed, epoch)
        later_showings = self.repeats > 1 or self.weights is not None  # a sample can come more than once
        source = _Repeats(self.dataset, self.seed, epoch) if later_showings else self.dataset
        return DataLoader(source, sampler=_StepSampler(len(self.dataset), self, epoch, start), **common)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Micro-batches of ``epoch`` from micro-batch ``start`` on. A tar-shard stream is read from the start of the
        epoch and the first ``start`` batches are dropped; a rank whose shards run out early starts them again, so
        that every rank yields the same number of batches (as DDP needs)."""
        produced = start
        if isinstance(self.dataset, IterableDataset):
            skip = start
            while produced < self.batches_per_epoch:
                before = produced
                for images, labels, skipped in _workers_started(self._dataloader(epoch, 0)):
                    if skip:
                        skip -= 1
                        continue
                    yield self._batch(epoch, produced, images, labels, skipped)
                    produced += 1
                    if produced >= self.batches_per_epoch:
                        return
                if produced == before and skip == 0:
                    raise InvalidValueError("the tar shards / data stream yielded no batches for this process")
            return
        for m, (images, labels, skipped) in enumerate(_workers_started(self._dataloader(epoch, start)), start):
            yield self._batch(epoch, m, images, labels, skipped)

    def _batch(self, epoch: int, m: int, images: torch.Tensor, labels: torch.Tensor, skipped: list[str]) -> Batch:
        """Micro-batch ``m`` of ``epoch`` on the device, with its samples' keys."""
        step, acc = divmod(m, self.accum_steps)
        keys = step_keys(self.seed, epoch, step, (acc * self.world_size + self.rank) * self.micro_batch, len(images))
        return Batch(images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True), skipped,
                     keys.to(self.device, non_blocking=True))


def folder_eval_batches(dataset: ImageFolderDataset | ShardDataset, preprocessing: Preprocessing,
                        batch_size: int = 64, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                        device: torch.device | str = "cpu") -> Iterator[Batch]:
    """This rank's share of an image folder (samples rank, rank + W, ...) or of the shards (split as in training),
    with the evaluation transform of ``preprocessing``; skipped files are reported in ``Batch.skipped``."""
    dataset.transform = preprocessing.transform()
    if isinstance(dataset, IterableDataset):  # tar shards, a streamed Hugging Face source: split by the data set
        dataset.shuffle_buffer = 0
        source = dataset
        sampler = None
    else:
        dataset.sample_seed = None
        source = dataset
        sampler = list(range(rank, len(dataset), world_size))
    loader = DataLoader(source, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        collate_fn=collate_skipping, worker_init_fn=_interruptible_worker if num_workers else None)
    for images, labels, skipped in _workers_started(loader):
        yield Batch(images.to(device), labels.to(device), skipped)
