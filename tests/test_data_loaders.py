"""Batched augmentation and the training / evaluation loaders: per-sample randomness, exact splits over processes and
accumulation steps, and batches that can be reproduced from a position (resumption)."""

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image

from vitlab.data import (
    ArrayDataset,
    Augment,
    FolderTrainLoader,
    InMemoryTrainLoader,
    build_dataset,
    in_memory_eval_batches,
)
from vitlab.data import batch_transforms as BT
from vitlab.data import sample_random as SR
from vitlab.data.loaders import epoch_order, folder_eval_batches, mix_seed
from vitlab.data.transforms import train_transform
from vitlab.errors import InvalidValueError
from vitlab.preprocessing import Preprocessing


def toy_arrays(n=40, size=6, channels=1) -> ArrayDataset:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, channels, size, size).contiguous()
    return ArrayDataset(images, torch.arange(n) % 4, ["a", "b", "c", "d"], "toy")


def test_to_float_is_the_papers_minus_one_one_scaling():
    x = torch.tensor([0, 127, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    torch.testing.assert_close(BT.to_float(x).flatten(), torch.tensor([-1.0, 127 / 127.5 - 1, 1.0]))


def test_random_shift_and_flip_match_a_per_image_reference():
    x = torch.randn(5, 2, 7, 7)
    keys = SR.sample_keys(3, torch.arange(5))
    shifted = BT.random_shift(x, 2, fill=0.0, keys=keys)
    offsets = (SR.keyed_uniform(keys, 2, SR.SHIFT) * 5).long().t()  # each sample's own two draws
    for i in range(5):
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        oy, ox = offsets[0, i], offsets[1, i]
        torch.testing.assert_close(shifted[i], padded[:, oy:oy + 7, ox:ox + 7])
    flipped = BT.random_flip(x, torch.Generator().manual_seed(0))
    for i in range(5):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))


def test_crop_resize_samples_like_torchvision_resized_crop():
    x = torch.rand(2, 3, 16, 16)
    boxes = torch.tensor([[4.0, 8.0, 8.0, 8.0], [0.0, 2.0, 16.0, 12.0]])  # (left, top, width, height)
    out = BT.crop_resize(x, boxes, (16, 16))
    for i, (left, top, w, h) in enumerate(boxes.long().tolist()):
        ref = TF.resized_crop(x[i], top=top, left=left, height=h, width=w, size=[16, 16], antialias=False)
        # same sample points; at the box edges torchvision clamps to the box, the batched crop reads the neighbours
        torch.testing.assert_close(out[i][..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1])
    torch.testing.assert_close(BT.crop_resize(x, torch.tensor([[0.0, 0, 16, 16]] * 2), (16, 16)), x)
    mirrored = BT.crop_resize(x, torch.tensor([[0.0, 0, 16, 16]] * 2), (16, 16), torch.tensor([True, False]))
    torch.testing.assert_close(mirrored[0], x[0].flip(-1))
    torch.testing.assert_close(mirrored[1], x[1])


def test_crop_boxes_follow_the_inception_distribution():
    boxes = BT.sample_crop_boxes(4000, 20, 30, scale=(0.05, 1.0), generator=torch.Generator().manual_seed(0))
    left, top, w, h = boxes.unbind(1)
    assert (left >= 0).all() and (top >= 0).all() and (left + w <= 30 + 1e-4).all() and (top + h <= 20 + 1e-4).all()
    area = w * h / 600
    assert area.min() >= 0.05 - 1e-4 and area.max() <= 1 + 1e-4
    # boxes small enough never to be clamped: area uniform in the range, log aspect ratio uniform around 0
    small = BT.sample_crop_boxes(4000, 20, 20, scale=(0.05, 0.3), generator=torch.Generator().manual_seed(1))
    area = small[:, 2] * small[:, 3] / 400
    log_aspect = (small[:, 2] / small[:, 3]).log()
    assert abs(area.mean().item() - 0.175) < 0.01 and abs(log_aspect.mean().item()) < 0.01
    assert log_aspect.max() <= np.log(4 / 3) + 1e-5 and log_aspect.min() >= np.log(3 / 4) - 1e-5


@pytest.mark.parametrize("world_size,accum", [(1, 1), (2, 1), (2, 2), (1, 4)])
@pytest.mark.parametrize("augment", [Augment(policy="none", flip=False), Augment(policy="inception"),
                                     Augment(policy="shift", max_shift=2, randaugment=(2, 9)),
                                     Augment(policy="flip", erasing=0.5)],
                         ids=["none", "inception", "shift-randaugment", "flip-erasing"])
def test_a_global_batch_is_the_same_augmented_samples_however_it_is_split(world_size, accum, augment):
    """Same samples, and every sample augmented with the same draws, on any number of processes and accumulation
    steps (the draws are keyed by the sample's place in the global batch, not by the rank)."""
    ds = toy_arrays()
    ds.images[:] = torch.randint(0, 256, ds.images.shape, generator=torch.Generator().manual_seed(0),
                                 dtype=torch.uint8)
    single = InMemoryTrainLoader(ds, 8, (6, 6), augment, seed=7)
    reference = list(single.epoch(0))  # step by step
    parts = [list(InMemoryTrainLoader(ds, 8, (6, 6), augment, seed=7, rank=r, world_size=world_size,
                                      accum_steps=accum).epoch(0)) for r in range(world_size)]
    for step, expected in enumerate(reference):
        chunks = [parts[r][step * accum + a] for a in range(accum) for r in range(world_size)]
        assert torch.equal(torch.cat([c.labels for c in chunks]), expected.labels)
        assert torch.equal(torch.cat([c.keys for c in chunks]), expected.keys)
        torch.testing.assert_close(torch.cat([c.images for c in chunks]), expected.images, rtol=0, atol=1e-6)
    assert single.steps_per_epoch == 5 and len(parts[0]) == 5 * accum
    if augment.policy != "none":  # the draws do differ between samples and steps
        assert not torch.equal(reference[0].images, list(InMemoryTrainLoader(ds, 8, (6, 6), Augment(
            policy="none", flip=False), seed=7).epoch(0))[0].images)
        assert len(set(torch.cat([b.keys for b in reference]).tolist())) == 40


def test_random_erasing_draws_torchvisions_rectangles_with_normal_noise():
    """One rectangle per erased image, of the area share and aspect ratio torchvision's ``RandomErasing`` draws,
    filled with standard normal noise; keyed: an image is erased the same in any batch."""
    keys = SR.sample_keys(123, torch.arange(8000))
    erased = BT.random_erasing(torch.zeros(8000, 3, 24, 32), 0.25, keys=keys)
    where = (erased != 0).any(dim=1)  # (B, H, W)
    hit = where.flatten(1).any(1)
    assert abs(hit.float().mean().item() - 0.25) < 0.02
    for image in where[hit][:200]:  # a whole rectangle: every pixel of its bounding box
        rows, cols = image.any(1).nonzero(), image.any(0).nonzero()
        assert image[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    ours = where[hit].flatten(1).float().mean(1)
    torch.manual_seed(0)
    torchvision_erasing = T.RandomErasing(p=1.0, scale=BT.ERASE_SCALE, ratio=BT.ERASE_RATIO, value="random")
    theirs = torch.stack([(torchvision_erasing(torch.zeros(3, 24, 32)) != 0).any(0).float().mean()
                          for _ in range(2000)])
    assert abs(ours.mean() - theirs.mean()) < 0.01 and abs(ours.std() - theirs.std()) < 0.01
    noise = erased[erased != 0]
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 1) < 0.01
    torch.testing.assert_close(BT.random_erasing(torch.zeros(5, 3, 24, 32), 0.25, keys=keys[100:105]),
                               erased[100:105], rtol=0, atol=0)
    assert BT.random_erasing(erased, 0.0, keys=keys) is erased
    # the per-image path (folders, shards, Hugging Face sets) erases with torchvision's transform
    grey = train_transform((24, 32), 3, "none", erasing=1.0)(Image.new("RGB", (32, 24), (128, 128, 128)))
    assert 0.01 < (grey != grey[0, 0, 0]).any(0).float().mean() < 0.4


def test_keyed_draws_are_uniform_and_independent_across_streams_and_counters():
    keys = SR.sample_keys(123, torch.arange(20_000))
    u = SR.keyed_uniform(keys, 3, SR.CROP)
    v = SR.keyed_uniform(keys, 1, SR.FLIP)[:, 0]
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.002
    for a, b in [(u[:, 0], u[:, 1]), (u[:, 1], u[:, 2]), (u[:, 0], v)]:
        assert abs(np.corrcoef(a.numpy(), b.numpy())[0, 1]) < 0.03
    counts = torch.histc(u[:, 0], bins=10, min=0, max=1)
    assert counts.min() > 1800 and counts.max() < 2200
    assert torch.equal(SR.keyed_uniform(keys[5:9], 3, SR.CROP), u[5:9])  # a sample's draws are its own
    assert not torch.equal(SR.sample_keys(124, torch.arange(4)), keys[:4])


def test_in_memory_batches_restart_exactly_from_a_position():
    ds = toy_arrays(size=10)
    aug = Augment(policy="inception", crop_scale=(0.3, 1.0))
    loader = InMemoryTrainLoader(ds, 8, (8, 8), aug, seed=1)
    full = list(loader.epoch(2))
    tail = list(InMemoryTrainLoader(ds, 8, (8, 8), aug, seed=1).epoch(2, start=3))
    for a, b in zip(full[3:], tail):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    other = list(loader.epoch(3))
    assert not torch.equal(full[0].labels, other[0].labels)  # a new order each epoch
    assert full[0].images.shape == (8, 1, 8, 8)


def test_evaluation_shares_cover_every_sample_once():
    ds = toy_arrays(n=23)
    pre = Preprocessing.for_model(6, 1)
    seen = []
    for rank in range(3):
        for batch in in_memory_eval_batches(ds, pre, batch_size=4, rank=rank, world_size=3):
            seen += ((batch.images[:, 0, 0, 0] + 1) * 127.5).round().long().tolist()
    assert sorted(seen) == list(range(23))


def _folder(root, n_per_class=6):
    rng = np.random.default_rng(0)
    for cls in ("x", "y"):
        (root / cls).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    (root / "y" / "broken.png").write_bytes(b"nope")


@pytest.mark.slow
def test_folder_batches_do_not_depend_on_workers_and_restart_exactly(tmp_path):
    _folder(tmp_path / "d")
    aug = Augment(policy="inception", crop_scale=(0.2, 1.0), erasing=0.5)

    def batches(workers, start=0):
        ds = build_dataset(tmp_path / "d")
        loader = FolderTrainLoader(ds, 4, (8, 8), aug, seed=3, num_workers=workers)
        return list(loader.epoch(1, start=start))

    serial, parallel, tail = batches(0), batches(2), batches(2, start=1)
    assert len(serial) == 3  # 13 files // 4
    for a, b in zip(serial, parallel):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.skipped == b.skipped
    for a, b in zip(serial[1:], tail):
        assert torch.equal(a.images, b.images)
    skipped = [r for b in serial for r in b.skipped]
    assert len(skipped) <= 1 and all("broken.png" in r for r in skipped)
    ds = build_dataset(tmp_path / "d")
    evaluated = [b for r in range(2) for b in folder_eval_batches(ds, Preprocessing.for_model(8), 5, r, 2)]
    assert sum(len(b.labels) for b in evaluated) == 12 and sum(len(b.skipped) for b in evaluated) == 1


def test_repeated_augmentation_shows_each_chosen_image_n_times_augmented_differently():
    indices, copies = epoch_order(10, seed=0, epoch=0, repeats=3)
    assert len(indices) == 10 and len(set(indices.tolist())) == 4  # ceil(10 / 3) images, the epoch keeps its length
    assert indices[:9].view(3, 3).T.eq(indices[0:9:3]).all()  # each shown 3 times in a row
    assert copies.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    assert torch.equal(epoch_order(10, 0, 0)[0], torch.randperm(10, generator=torch.Generator().manual_seed(
        mix_seed(0, 0))))  # no repetition: the order every run had
    ds = toy_arrays()
    ds.images[:] = torch.randint(0, 256, ds.images.shape, generator=torch.Generator().manual_seed(0),
                                 dtype=torch.uint8)
    aug = Augment(policy="inception")
    batch = next(iter(InMemoryTrainLoader(ds, 12, (6, 6), aug, seed=7, repeats=3).epoch(0)))
    labels, images = batch.labels.view(4, 3), batch.images.view(4, 3, -1)
    assert (labels == labels[:, :1]).all()  # three showings of each image ...
    for shown in images:  # ... each cropped and flipped its own way
        assert not torch.equal(shown[0], shown[1]) and not torch.equal(shown[1], shown[2])
    halves = [next(iter(InMemoryTrainLoader(ds, 12, (6, 6), aug, seed=7, rank=r, world_size=2, repeats=3).epoch(0)))
              for r in range(2)]
    torch.testing.assert_close(torch.cat([h.images for h in halves]), batch.images, rtol=0, atol=1e-6)

    class Stream(torch.utils.data.IterableDataset):  # tar shards, a streamed Hugging Face source
        def __iter__(self):
            return iter(())

    with pytest.raises(InvalidValueError, match="repeated augmentation .* needs random access"):
        FolderTrainLoader(Stream(), 6, (8, 8), aug, repeats=3)


@pytest.mark.slow
def test_repeated_augmentation_of_a_folder_does_not_depend_on_workers(tmp_path):
    _folder(tmp_path / "d", n_per_class=9)
    aug = Augment(policy="inception", crop_scale=(0.2, 1.0))

    def batches(workers):
        loader = FolderTrainLoader(build_dataset(tmp_path / "d"), 6, (8, 8), aug, seed=3, num_workers=workers,
                                   repeats=3)
        return list(loader.epoch(0))

    serial, parallel = batches(0), batches(2)
    for a, b in zip(serial, parallel):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    good = [b for b in serial if not b.skipped]
    shown = good[0].images.view(2, 3, -1)
    assert (good[0].labels.view(2, 3) == good[0].labels.view(2, 3)[:, :1]).all()
    assert all(not torch.equal(s[0], s[1]) and not torch.equal(s[1], s[2]) for s in shown)
