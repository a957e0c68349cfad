"""Image-text retrieval: recall@K of an image-text model (CLIP, SigLIP) on captioned images, both ways.

Image -> text: an image is retrieved correctly at K when any of its captions is among the K texts most similar to
it; text -> image: a caption when its image is among the K most similar images (the protocol of CLIP's paper,
section 3.1.5 / table 13, on Flickr30k and MS-COCO, and of clip_benchmark). Similarity is the dot product of unit
embeddings (the cosine); SigLIP's logit scale and bias change no ranking.

Ranks are exact and deterministic: a query's rank is that of its best-scored correct item in the order of
decreasing similarity, ties broken by index (the lower index first, as a stable sort of the scores would list
them). The similarity matrix is computed a block of query rows at a time (at most ``block_elements`` scores in
memory), so 25k images x 125k captions never need their 3.1e9 scores at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..devices import autocast
from ..errors import InvalidValueError, VitlabError
from ..models.image_text import embed_texts

DEFAULT_KS = (1, 5, 10)
BLOCK_ELEMENTS = 1 << 24  # scores per block: 64 MiB of float32
FLOAT_COUNT_LIMIT = 1 << 24  # below this many keys a float32 sum of 0 / 1 flags is an exact count


def _first_correct_ranks(queries: torch.Tensor, keys: torch.Tensor, pairs, block_elements: int) -> torch.Tensor:
    """0-based rank (Q,) int64 of each query's best correct key among all keys (ties: the lower index first).
    ``pairs(start, end)`` gives the correct (query - start, key) pairs of queries ``start:end`` as two int64
    tensors; every query has at least one.

    Each block's scores and flags go into buffers allocated once (6 bytes per score), and the counts are summed in
    the scores' buffer as float32 (exact below 2^24 keys): a fresh int64 copy per block, which summing a bool matrix
    makes on the CPU, would be the largest allocation, and allocating per block lets the C allocator's heap grow
    with the number of blocks."""
    size, device = keys.shape[0], keys.device
    rows_per_block = max(1, min(queries.shape[0], block_elements // max(1, size)))
    positions = torch.arange(size, device=device)
    scores_buffer = torch.empty(rows_per_block, size, device=device, dtype=torch.float32)
    ahead_buffer = torch.empty(rows_per_block, size, device=device, dtype=torch.bool)
    other_buffer = torch.empty_like(ahead_buffer)
    exact_in_float = size < FLOAT_COUNT_LIMIT
    ranks = []
    for start in range(0, queries.shape[0], rows_per_block):
        end = min(start + rows_per_block, queries.shape[0])
        scores, ahead, other = scores_buffer[: end - start], ahead_buffer[: end - start], other_buffer[: end - start]
        torch.matmul(queries[start:end], keys.T, out=scores)  # one product: a score is one number wherever read
        rows, cols = pairs(start, end)
        values = scores[rows, cols]
        best = torch.full((end - start,), float("-inf"), device=device).scatter_reduce(0, rows, values, "amax")
        at_best = values == best[rows]
        first = torch.full((end - start,), size, device=device, dtype=torch.int64)
        first = first.scatter_reduce(0, rows[at_best], cols[at_best], "amin")  # the first correct key at the best
        # ranked ahead of it: a higher score, or the same score at a lower index
        torch.eq(scores, best[:, None], out=ahead)
        torch.lt(positions, first[:, None], out=other)
        ahead.logical_and_(other)
        torch.gt(scores, best[:, None], out=other)
        ahead.logical_or_(other)
        if exact_in_float:
            scores.copy_(ahead)  # the scores are done with: count in their buffer
            ranks.append(scores.sum(dim=1).long())
        else:
            ranks.append(ahead.sum(dim=1))
    return torch.cat(ranks).cpu()


def _summary(ranks: torch.Tensor, ks: Sequence[int]) -> dict:
    values = ranks.numpy()
    out = {f"recall@{k}": float((values < k).mean()) for k in ks}
    out["mean_rank"] = float(values.mean() + 1)
    out["median_rank"] = float(np.median(values) + 1)
    return out


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise InvalidValueError(f"recall@K: give positive K values, got {list(ks)}", options=("ks",))
    return tuple(sorted(set(ks)))


@torch.no_grad()
def retrieval_metrics(image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_image: Sequence[int] | torch.Tensor,
                      ks: Sequence[int] = DEFAULT_KS, block_elements: int = BLOCK_ELEMENTS) -> dict:
    """Recall@K, mean and median rank (1 = first) of image -> text and text -> image retrieval.

    ``image_embeds`` (N, P), ``text_embeds`` (M, P): unit embeddings (any scale ranks the same; they are compared as
    given, on their device, in float32); ``text_image`` (M,): the image index of each text. Every image needs at
    least one text. Returns ``{"images": N, "texts": M, "image_to_text": {...}, "text_to_image": {...}}``, each
    direction with ``recall@K`` for ``ks`` (fractions), ``mean_rank`` and ``median_rank``."""
    ks = check_ks(ks)
    images, texts = image_embeds.float(), text_embeds.to(image_embeds.device).float()
    owner = torch.as_tensor(np.asarray(text_image, dtype=np.int64)).to(images.device)
    if images.dim() != 2 or texts.dim() != 2 or images.shape[1] != texts.shape[1]:
        raise InvalidValueError(f"embeddings of images {tuple(images.shape)} and texts {tuple(texts.shape)} must be "
                                "(N, P) and (M, P) of one width P")
    if owner.shape != (texts.shape[0],):
        raise InvalidValueError(f"text_image has {tuple(owner.shape)} entries for {texts.shape[0]} texts")
    if len(owner) and (owner.min() < 0 or owner.max() >= images.shape[0]):
        raise InvalidValueError(f"text_image: image indices must be in 0..{images.shape[0] - 1}")
    if images.shape[0] == 0 or texts.shape[0] == 0:
        raise VitlabError("retrieval needs at least one image and one text")
    counts = torch.bincount(owner, minlength=images.shape[0])
    if bool((counts == 0).any()):
        raise VitlabError(f"image {int((counts == 0).nonzero()[0])} has no caption; every image needs one")
    by_image = torch.argsort(owner, stable=True)  # the texts grouped by image
    sorted_owner = owner[by_image]

    def captions_of(start, end):  # the (image - start, text) pairs of images start:end
        lo, hi = (int(torch.searchsorted(sorted_owner, v)) for v in (start, end))
        return sorted_owner[lo:hi] - start, by_image[lo:hi]

    def image_of(start, end):  # the (text - start, image) pairs of texts start:end
        return torch.arange(end - start, device=owner.device), owner[start:end]

    i2t = _first_correct_ranks(images, texts, captions_of, block_elements)
    t2i = _first_correct_ranks(texts, images, image_of, block_elements)
    return {"images": int(images.shape[0]), "texts": int(texts.shape[0]),
            "image_to_text": _summary(i2t, ks), "text_to_image": _summary(t2i, ks)}


def _device_of(module: torch.nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _collate(items):
    good = [(x, i) for x, i in items if isinstance(x, torch.Tensor)]
    bad = [(x.reason, i) for x, i in items if not isinstance(x, torch.Tensor)]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, [i for _, i in good], bad


@torch.no_grad()
def embed_images(model, dataset: Dataset, batch_size: int = 256, num_workers: int = 0,
                 precision: str = "fp32", progress: bool = False
                 ) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
    """Unit image embeddings (n, P) float32 of a data set of ``(image tensor or BadSample, index)`` items
    (:class:`~vitlab.data.captions.CaptionedImages` with a transform), by ``model``'s image tower; returns them with
    the indices of the images embedded and (index, reason) of those that could not be read. ``progress``: a tqdm bar
    on stderr."""
    device = _device_of(model.visual)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda")
    batches = loader
    if progress:
        from tqdm import tqdm

        batches = tqdm(loader, desc="images", leave=False)
    chunks, kept, bad = [], [], []
    for images, indices, failed in batches:
        bad.extend((i, reason) for reason, i in failed)
        if images is None:
            continue
        with autocast(device, precision):
            features = model.encode_image(images.to(device, non_blocking=True), normalize=False)
        chunks.append(F.normalize(features.float(), dim=-1).cpu())
        kept.extend(indices)
    return (torch.cat(chunks) if chunks else torch.empty(0, model.embed_dim)), kept, bad


def evaluate_retrieval(model, data, ks: Sequence[int] = DEFAULT_KS, batch_size: int = 256, num_workers: int = 0,
                       precision: str = "fp32", block_elements: int = BLOCK_ELEMENTS, progress: bool = False) -> dict:
    """Image <-> text retrieval of an image-text ``model`` on captioned images ``data``
    (:class:`~vitlab.data.captions.CaptionedImages`, its ``transform`` the model's preprocessing): the embeddings
    on the model's device, then :func:`retrieval_metrics` there. Images that cannot be read are left out with their
    captions and counted in ``skipped`` (their reasons in ``skipped_images``, the first 20). ``progress``: a tqdm bar
    over the image batches."""
    ks = check_ks(ks)
    was_training = model.training
    model.eval()
    try:
        image_embeds, kept, bad = embed_images(model, data, batch_size, num_workers, precision, progress)
        owner = np.asarray(data.text_image)
        keep_texts = np.isin(owner, np.asarray(kept, dtype=np.int64))
        if not keep_texts.any():
            raise VitlabError(f"{data.name}: no image could be read" + (f" ({bad[0][1]})" if bad else ""))
        renumber = np.full(len(data), -1, dtype=np.int64)
        renumber[np.asarray(kept, dtype=np.int64)] = np.arange(len(kept))
        texts = [t for t, keep in zip(data.texts, keep_texts) if keep]
        text_embeds = embed_texts(model, texts, batch_size, precision)
    finally:
        model.train(was_training)
    results = retrieval_metrics(image_embeds.to(_device_of(model.visual)), text_embeds, renumber[owner[keep_texts]],
                                ks, block_elements)
    results["skipped"] = len(bad)
    if bad:
        results["skipped_images"] = [reason for _, reason in bad[:20]]
    return results


__all__ = ["BLOCK_ELEMENTS", "DEFAULT_KS", "embed_images", "embed_texts", "evaluate_retrieval",
           "retrieval_metrics"]
