"""big_vision two-tower ``.npz`` files (SigLIP's own releases): a tiny transformers SiglipModel written in big_vision's
names by an independent numpy conversion (Flax kernels are the transposed torch weights, attention kernels split per
head), then read back by vitlab; the text (and image) embeddings must equal transformers'."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitlab.checkpoints.big_vision_text import big_vision_text_tower
from vitlab.errors import VitlabError

transformers = pytest.importorskip("transformers")

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)
TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16, eos_token_id=1, pad_token_id=1)


def _siglip():
    from transformers import SiglipConfig, SiglipModel

    model = SiglipModel(SiglipConfig(text_config=TEXT, vision_config=VISION)).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.3 * noise)
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-4.0)
    return model


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().astype(np.float32)


def _encoder_layer(layer, heads: int) -> dict[str, np.ndarray]:
    """One transformers encoder layer in big_vision's Linen names."""
    out = {}
    for flax, norm in (("LayerNorm_0", layer.layer_norm1), ("LayerNorm_1", layer.layer_norm2)):
        out[f"{flax}/scale"], out[f"{flax}/bias"] = _np(norm.weight), _np(norm.bias)
    attn = layer.self_attn
    for flax, proj in (("query", attn.q_proj), ("key", attn.k_proj), ("value", attn.v_proj)):
        dim = proj.weight.shape[1]
        out[f"MultiHeadDotProductAttention_0/{flax}/kernel"] = _np(proj.weight).T.reshape(dim, heads, -1)
        out[f"MultiHeadDotProductAttention_0/{flax}/bias"] = _np(proj.bias).reshape(heads, -1)
    out["MultiHeadDotProductAttention_0/out/kernel"] = _np(attn.out_proj.weight).T.reshape(heads, -1, dim)
    out["MultiHeadDotProductAttention_0/out/bias"] = _np(attn.out_proj.bias)
    for flax, fc in (("Dense_0", layer.mlp.fc1), ("Dense_1", layer.mlp.fc2)):
        out[f"MlpBlock_0/{flax}/kernel"], out[f"MlpBlock_0/{flax}/bias"] = _np(fc.weight).T, _np(fc.bias)
    return out


def _encoder(layers, heads: int, scanned: bool) -> dict[str, np.ndarray]:
    blocks = [_encoder_layer(layer, heads) for layer in layers]
    if scanned:
        return {f"encoderblock/{k}": np.stack([b[k] for b in blocks]) for k in blocks[0]}
    return {f"encoderblock_{i}/{k}": v for i, b in enumerate(blocks) for k, v in b.items()}


def big_vision_arrays(model, scanned: bool = True, split_posemb: bool = False) -> dict[str, np.ndarray]:
    """``model`` (a transformers SiglipModel) as big_vision's two-tower ``params``."""
    text, vision = model.text_model, model.vision_model
    heads = TEXT["num_attention_heads"]
    txt = {"Embed_0/embedding": _np(text.embeddings.token_embedding.weight),
           "pos_embedding": _np(text.embeddings.position_embedding.weight)[None],
           "Encoder_0/encoder_norm/scale": _np(text.final_layer_norm.weight),
           "Encoder_0/encoder_norm/bias": _np(text.final_layer_norm.bias),
           "head/kernel": _np(text.head.weight).T, "head/bias": _np(text.head.bias)}
    if split_posemb:  # an older file: the position embedding in two halves that big_vision adds
        txt["Encoder_0/pos_embedding"] = 0.25 * txt["pos_embedding"]
        txt["pos_embedding"] = 0.75 * txt["pos_embedding"]
    txt.update({f"Encoder_0/{k}": v for k, v in _encoder(text.encoder.layers, heads, scanned).items()})
    conv = vision.embeddings.patch_embedding
    img = {"embedding/kernel": _np(conv.weight).transpose(2, 3, 1, 0), "embedding/bias": _np(conv.bias),
           "pos_embedding": _np(vision.embeddings.position_embedding.weight)[None],
           "Transformer/encoder_norm/scale": _np(vision.post_layernorm.weight),
           "Transformer/encoder_norm/bias": _np(vision.post_layernorm.bias)}
    img.update({f"Transformer/{k}": v for k, v in _encoder(vision.encoder.layers, heads, scanned).items()})
    pool = vision.head
    dim = VISION["hidden_size"]
    img["MAPHead_0/probe"] = _np(pool.probe)
    for i, flax in enumerate(("query", "key", "value")):
        w = _np(pool.attention.in_proj_weight)[i * dim:(i + 1) * dim]
        b = _np(pool.attention.in_proj_bias)[i * dim:(i + 1) * dim]
        img[f"MAPHead_0/MultiHeadDotProductAttention_0/{flax}/kernel"] = w.T.reshape(dim, heads, -1)
        img[f"MAPHead_0/MultiHeadDotProductAttention_0/{flax}/bias"] = b.reshape(heads, -1)
    img["MAPHead_0/MultiHeadDotProductAttention_0/out/kernel"] = \
        _np(pool.attention.out_proj.weight).T.reshape(heads, -1, dim)
    img["MAPHead_0/MultiHeadDotProductAttention_0/out/bias"] = _np(pool.attention.out_proj.bias)
    img["MAPHead_0/LayerNorm_0/scale"], img["MAPHead_0/LayerNorm_0/bias"] = \
        _np(pool.layernorm.weight), _np(pool.layernorm.bias)
    for flax, fc in (("Dense_0", pool.mlp.fc1), ("Dense_1", pool.mlp.fc2)):
        img[f"MAPHead_0/MlpBlock_0/{flax}/kernel"], img[f"MAPHead_0/MlpBlock_0/{flax}/bias"] = \
            _np(fc.weight).T, _np(fc.bias)
    arrays = {f"params/txt/{k}": v for k, v in txt.items()}
    arrays.update({f"params/img/{k}": v for k, v in img.items()})
    arrays["params/t"], arrays["params/b"] = _np(model.logit_scale).reshape(1), _np(model.logit_bias).reshape(1)
    return arrays


def _tokens(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.ones(3, 16, dtype=torch.long)  # padded with the end-of-text id, as SigLIP's tokenizer does
    for row, n in enumerate((4, 9, 16)):
        tokens[row, : n - 1] = torch.randint(2, 99, (n - 1,), generator=gen)
    return tokens


@pytest.mark.parametrize("scanned, split_posemb", [(True, False), (False, True)])
def test_text_tower_equals_transformers(scanned, split_posemb):
    ref = _siglip()
    tower = big_vision_text_tower(big_vision_arrays(ref, scanned, split_posemb), "webli.npz")
    assert tower.layout == "big_vision" and not tower.config.causal and tower.config.pool == "last"
    assert any("pos_embedding added" in n for n in tower.notes) == split_posemb
    text = tower.build("webli.npz")
    tokens = _tokens()
    with torch.no_grad():
        expected = ref.get_text_features(input_ids=tokens)
        expected = getattr(expected, "pooler_output", expected)
        torch.testing.assert_close(text(tokens), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tower.logit_scale, ref.logit_scale.detach())
    torch.testing.assert_close(tower.logit_bias, ref.logit_bias.detach())


def test_missing_or_partial_text_towers_are_named():
    arrays = big_vision_arrays(_siglip())
    image_only = {k: v for k, v in arrays.items() if not k.startswith("params/txt/")}
    with pytest.raises(VitlabError, match="no text tower in this .npz.*loads with vitlab.load"):
        big_vision_text_tower(image_only, "img.npz")
    broken = {k: v for k, v in arrays.items() if "encoder_norm" not in k or "img" in k}
    with pytest.raises(VitlabError, match="missing arrays: Transformer/encoder_norm/scale, Transformer/encoder_norm"):
        big_vision_text_tower(broken, "broken.npz")
    no_t = {k: v for k, v in arrays.items() if k != "params/t"}
    with pytest.raises(VitlabError, match="no 't'"):
        big_vision_text_tower(no_t, "no_t.npz")


def test_load_image_text_reads_both_towers_of_the_npz(tmp_path, capsys):
    """The whole file: vitlab.load_image_text gives transformers' logits_per_image (image tower from params/img,
    text tower from params/txt, t and b), and vitlab zero-shot writes a classifier from it."""
    import vitlab
    from vitlab.cli import main

    ref = _siglip()
    path = tmp_path / "webli_en_b16_32.npz"
    np.savez(path, **big_vision_arrays(ref))
    model = vitlab.load_image_text(path)
    assert model.tokenizer is None and model.logit_bias is not None
    images, tokens = torch.randn(2, 3, 32, 32), _tokens(1)
    with torch.no_grad():
        expected = ref(input_ids=tokens, pixel_values=images).logits_per_image
        torch.testing.assert_close(model(images, tokens), expected, rtol=1e-5, atol=1e-5)
    # without a tokenizer the zero-shot command says what is missing, in one line
    assert main(["zero-shot", str(path), "--classes", "a,b", "--out", str(tmp_path / "c.safetensors")]) == 2
    error = capsys.readouterr().err
    assert "no tokenizer" in error and error.count("\n") == 1, error
