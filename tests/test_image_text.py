"""Two-tower image-text models (CLIP, SigLIP): vitlab's towers, logits and tokenizers against transformers' on tiny
random models, the OpenCLIP layout, the Hub round trip and the one-line errors."""

from __future__ import annotations

import math

import pytest
import torch

import vitlab

transformers = pytest.importorskip("transformers")

SENTENCES = ["a photo of a cat.", "A PHOTO of   a dog!", "an origami crane, folded from paper", "x",
             "the quick brown fox jumps over the lazy dog " * 4]
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)
TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16)


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (LayerNorms and biases included), so that a wrongly mapped tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("logit_scale"):
                p.fill_(math.log(7.0))
            elif name.endswith("logit_bias"):
                p.fill_(-2.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.3 * noise if p.dim() > 1 else 0.1 * noise)


def _clip(tmp_path, eos_token_id=98, projection_dim=24, act="quick_gelu"):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(text_config={**TEXT, "eos_token_id": eos_token_id, "bos_token_id": 97, "pad_token_id": 0,
                                  "hidden_act": act},
                     vision_config={**VISION, "hidden_act": act}, projection_dim=projection_dim)
    model = CLIPModel(cfg).eval()
    _randomise(model)
    folder = tmp_path / "clip"
    model.save_pretrained(folder)
    return model, folder


def _siglip(tmp_path):
    from transformers import SiglipConfig, SiglipModel

    model = SiglipModel(SiglipConfig(text_config={**TEXT, "eos_token_id": 1, "pad_token_id": 1},
                                     vision_config=VISION)).eval()
    _randomise(model, seed=1)
    folder = tmp_path / "siglip"
    model.save_pretrained(folder)
    return model, folder


def _padded_tokens(eos: int, lengths=(5, 9, 16), pad: int = 0, seed: int = 0):
    """A batch of token rows of different lengths, each ending in ``eos`` and padded to 16 (+ attention mask)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.full((len(lengths), 16), pad, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for row, n in enumerate(lengths):
        tokens[row, : n - 1] = torch.randint(2, 90, (n - 1,), generator=gen)
        tokens[row, n - 1] = eos
        mask[row, :n] = 1
    return tokens, mask


# ------------------------------------------------------------------------------------------------- towers
def test_clip_matches_transformers_text_image_and_logits_on_padded_batches(tmp_path):
    ref, folder = _clip(tmp_path)
    model = vitlab.load_image_text(folder)
    assert model.text.cfg.causal and model.text.cfg.pool == "eos" and model.text.cfg.eos_id == 98
    assert model.logit_bias is None and model.tokenizer is None
    tokens, mask = _padded_tokens(eos=98)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = ref(input_ids=tokens, attention_mask=mask, pixel_values=images)
        text = model.encode_text(tokens, normalize=False)
        features = ref.get_text_features(input_ids=tokens, attention_mask=mask)
        features = getattr(features, "pooler_output", features)  # transformers 5 returns an output object
        torch.testing.assert_close(text, features, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_image(images), out.image_embeds, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(tokens), out.text_embeds, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(images, tokens), out.logits_per_image, rtol=1e-5, atol=1e-5)
        # the causal mask: what follows the end-of-text token changes nothing
        other = tokens.clone()
        other[0, 5:] = 7
        torch.testing.assert_close(model.encode_text(other)[0], model.encode_text(tokens)[0], rtol=0, atol=0)


def test_clip_legacy_eos_id_pools_the_highest_token_id(tmp_path):
    ref, folder = _clip(tmp_path, eos_token_id=2)  # configs written before transformers#24773
    model = vitlab.load_image_text(folder)
    assert model.text.cfg.eos_id is None
    tokens, mask = _padded_tokens(eos=98)
    with torch.no_grad():
        expected = ref(input_ids=tokens, attention_mask=mask, pixel_values=torch.zeros(1, 3, 32, 32)).text_embeds
        torch.testing.assert_close(model.encode_text(tokens), expected, rtol=1e-5, atol=1e-5)


def test_siglip_matches_transformers_text_image_and_logits(tmp_path):
    ref, folder = _siglip(tmp_path)
    model = vitlab.load_image_text(folder)
    assert not model.text.cfg.causal and model.text.cfg.pool == "last" and model.text.cfg.proj_bias
    assert model.logit_bias is not None and model.logit_scale.shape == (1,)
    tokens, _ = _padded_tokens(eos=1, pad=1)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = ref(input_ids=tokens, pixel_values=images)
        torch.testing.assert_close(model.encode_image(images), out.image_embeds, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(tokens), out.text_embeds, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(images, tokens), out.logits_per_image, rtol=1e-5, atol=1e-5)
