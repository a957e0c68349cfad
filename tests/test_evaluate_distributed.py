"""Exact evaluation across processes: a 2-process gloo group on the CPU gives the one-process numbers."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler, TensorDataset

from tests.conftest import randomize_
from vitlab.evaluate.classification import evaluate_classifier
from vitlab.evaluate.distributed import ShardSampler, gather_by_index
from vitlab.evaluate.features import model_outputs
from vitlab.models import VisionTransformer, ViTConfig

NUM_SAMPLES = 23  # odd: the shards differ in size, and DistributedSampler would pad one duplicate


def _model() -> VisionTransformer:
    cfg = ViTConfig(img_size=8, patch_size=4, in_chans=1, num_classes=5, embed_dim=16, depth=2, num_heads=2,
                    mlp_dim=32)
    return randomize_(VisionTransformer(cfg), std=0.3).eval()


def _dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(7)
    return TensorDataset(torch.randn(NUM_SAMPLES, 1, 8, 8, generator=gen), torch.randint(0, 5, (NUM_SAMPLES,),
                                                                                          generator=gen))


def _run_everything(batch_size: int) -> dict:
    model, data = _model(), _dataset()
    metrics = evaluate_classifier(model, data, batch_size=batch_size, ks=(1, 2))
    feats, labels, _ = model_outputs(model, data, "pre_logits", batch_size=batch_size)
    return {"metrics": metrics, "features": feats, "labels": labels}


def _worker(rank: int, world_size: int, port: int, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        out = {"batch4": _run_everything(4), "batch1": _run_everything(1)}
        # DistributedSampler pads rank 1 with a repeat of sample 0: gathering by index drops it
        sampler = DistributedSampler(range(NUM_SAMPLES), num_replicas=world_size, rank=rank, shuffle=False)
        idx = torch.tensor(list(sampler))
        out["padded_gather"] = gather_by_index(idx, idx.double() * 10)
        out["local_count"] = len(idx)
        results[rank] = out
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shards_cover_every_sample_once_without_padding():
    shards = [list(ShardSampler(10, rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(10)) and [len(s) for s in shards] == [4, 3, 3]


def test_gather_without_a_group_dedupes_and_sorts():
    idx, rows = gather_by_index(torch.tensor([3, 1, 3, 0]), torch.tensor([[30.0], [10.0], [30.0], [0.0]]))
    assert idx.tolist() == [0, 1, 3] and rows.flatten().tolist() == [0.0, 10.0, 30.0]


@pytest.mark.slow
def test_two_process_evaluation_equals_one_process_exactly():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the thread count can change the order of float sums
    try:
        single = {"batch4": _run_everything(4), "batch1": _run_everything(1)}
    finally:
        torch.set_num_threads(threads)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), results), nprocs=2, join=True)
        results = dict(results)
    for rank in (0, 1):
        for key in ("batch4", "batch1"):
            ours, ref = results[rank][key], single[key]
            # counts and everything derived from the argmax agree exactly
            for name in ("num_samples", "top1", "top2", "confusion_matrix", "per_class_accuracy"):
                assert ours["metrics"][name] == ref["metrics"][name], (rank, key, name)
            assert torch.equal(ours["labels"], ref["labels"])
            torch.testing.assert_close(ours["features"], ref["features"], rtol=0, atol=1e-6)
        # one sample per batch: the same arithmetic on both sides, so everything is bitwise equal
        assert results[rank]["batch1"]["metrics"] == single["batch1"]["metrics"]
        assert torch.equal(results[rank]["batch1"]["features"], single["batch1"]["features"])
        idx, rows = results[rank]["padded_gather"]
        assert idx.tolist() == list(range(NUM_SAMPLES)) and rows.tolist() == [10.0 * i for i in range(NUM_SAMPLES)]
    assert results[0]["local_count"] + results[1]["local_count"] == NUM_SAMPLES + 1  # the padded duplicate
    assert single["batch4"]["metrics"]["num_samples"] == NUM_SAMPLES
