"""Image-text retrieval: recall@K / ranks against a brute-force numpy computation (ties and duplicates included),
captioned manifests and Hugging Face sources, ``vitlab eval --retrieval`` against transformers' CLIP embeddings, and
joint-space embeddings written by ``vitlab predict`` (images and texts) against transformers' ``image_embeds`` /
``text_embeds``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vitlab.errors import VitlabError
from vitlab.evaluate.retrieval import retrieval_metrics


def _brute_force(images: np.ndarray, texts: np.ndarray, owner: np.ndarray, ks) -> dict:
    """The whole similarity matrix in float64, every row sorted (stable: ties in index order), the first correct
    item's position in the sorted row."""
    scores = images.astype(np.float64) @ texts.astype(np.float64).T  # (N, M)

    def ranks(matrix, correct):
        out = []
        for row, good in zip(matrix, correct):
            order = np.argsort(-row, kind="stable")
            out.append(int(np.flatnonzero(good[order])[0]))
        return np.array(out)

    i2t = ranks(scores, owner[None, :] == np.arange(len(images))[:, None])
    t2i = ranks(scores.T, np.arange(len(images))[None, :] == owner[:, None])

    def summary(r):
        return {**{f"recall@{k}": float((r < k).mean()) for k in ks}, "mean_rank": float(r.mean() + 1),
                "median_rank": float(np.median(r) + 1)}

    return {"image_to_text": summary(i2t), "text_to_image": summary(t2i)}


def _quantised(rng, n, dim=6):
    """Vectors of multiples of 1/4 in [-1, 1]: their dot products are exact in float32 and float64, so ties are
    ties whatever order a product sums in."""
    return rng.integers(-4, 5, (n, dim)).astype(np.float32) / 4


@pytest.mark.parametrize("block", [1, 7, 1 << 20], ids=["row", "blocks", "whole"])
def test_recalls_and_ranks_equal_brute_force_with_ties_and_duplicates(block):
    rng = np.random.default_rng(0)
    images = _quantised(rng, 12)
    images[5] = images[2]  # a duplicate image
    owner = np.concatenate([np.arange(12), rng.integers(0, 12, 25)])  # every image captioned, some several times
    texts = _quantised(rng, len(owner))
    texts[7] = texts[3]  # duplicate captions of different images
    texts[30] = texts[3]
    texts[10] = images[owner[10]]  # a caption equal to its image
    ks = (1, 2, 5, 10)
    got = retrieval_metrics(torch.from_numpy(images), torch.from_numpy(texts), owner, ks, block_elements=block)
    want = _brute_force(images, texts, owner, ks)
    assert got["images"] == 12 and got["texts"] == 37
    for direction in ("image_to_text", "text_to_image"):
        assert got[direction] == pytest.approx(want[direction], abs=1e-12), direction
    # there were ties to break (else the test would prove little about them)
    scores = images @ texts.T
    assert any(len(set(row)) < len(row) for row in scores)


def test_ties_rank_the_lower_index_first():
    # every score equal: each query's rank is the index of its first correct item
    images, texts = torch.ones(3, 4), torch.ones(5, 4)
    owner = [2, 0, 1, 2, 1]
    got = retrieval_metrics(images, texts, owner, ks=(1, 2))
    # image 0's caption is text 1 (rank 2), image 1's first is text 2 (rank 3), image 2's text 0 (rank 1)
    assert got["image_to_text"] == {"recall@1": pytest.approx(1 / 3), "recall@2": pytest.approx(2 / 3),
                                    "mean_rank": 2.0, "median_rank": 2.0}
    # each text's rank is its image's index + 1
    assert got["text_to_image"]["mean_rank"] == pytest.approx((3 + 1 + 2 + 3 + 2) / 5)


def test_bad_inputs_are_refused_in_one_line():
    with pytest.raises(VitlabError, match="image 1 has no caption"):
        retrieval_metrics(torch.eye(3), torch.eye(3), [0, 2, 2])
    with pytest.raises(VitlabError, match="image indices must be in 0..2"):
        retrieval_metrics(torch.eye(3), torch.eye(3), [0, 1, 3])
    with pytest.raises(VitlabError, match="one width P"):
        retrieval_metrics(torch.eye(3), torch.ones(3, 2), [0, 1, 2])
    with pytest.raises(VitlabError, match="positive K"):
        retrieval_metrics(torch.eye(3), torch.eye(3), [0, 1, 2], ks=(0,))
