"""Tiny CLIP / SigLIP models with random weights, saved by transformers with a word-level ``tokenizer.json``, for the
tests of what is built on image-text models (zero-shot classification, retrieval, joint-space embeddings). The
transformers model stays the oracle: tests compare vitlab's numbers with its ``logits_per_image``, ``image_embeds``
and ``text_embeds``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["a", "photo", "of", "the", "cat", "dog", "race", "car", "drawing", "small", "large", "blurry", "."]
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)
TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16)


def write_tokenizer(folder: Path, start: str | None, end: str, end_id: int, pad: str) -> None:
    """A word-level ``tokenizer.json`` of :data:`WORDS` (lowercased, words and punctuation apart, closed by ``end``)
    and its config."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}, end: end_id}
    if start:
        vocab[start] = 97
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=([start] if start else []) + ["$A", end],
        special_tokens=[(end, end_id)] + ([(start, 97)] if start else []))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": pad, "eos_token": end}))


def randomise_pair(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter of a transformers image-text model random (norms near 1), logit scale 2 and bias -1.5."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("logit_scale"):
                p.fill_(2.0)
            elif name.endswith("logit_bias"):
                p.fill_(-1.5)
            else:
                p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.3 * noise)
    return model.eval()


def clip_folder(folder: Path, seed: int = 3):
    """(transformers CLIPModel, folder): a tiny random CLIP (projection 24) saved with its tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(text_config={**TEXT, "eos_token_id": 98, "bos_token_id": 97, "pad_token_id": 0,
                                  "hidden_act": "quick_gelu"},
                     vision_config={**VISION, "hidden_act": "quick_gelu"}, projection_dim=24)
    ref = randomise_pair(CLIPModel(cfg), seed)
    ref.save_pretrained(folder)
    write_tokenizer(folder, "<|startoftext|>", "<|endoftext|>", 98, "<pad>")
    return ref, folder


def siglip_folder(folder: Path, seed: int = 4):
    """(transformers SiglipModel, folder): a tiny random SigLIP saved with its tokenizer."""
    from transformers import SiglipConfig, SiglipModel

    ref = randomise_pair(SiglipModel(SiglipConfig(text_config={**TEXT, "eos_token_id": 1, "pad_token_id": 1},
                                                  vision_config=VISION)), seed)
    ref.save_pretrained(folder)
    write_tokenizer(folder, None, "</s>", 1, "</s>")
    return ref, folder
