"""Two-tower image-text models (CLIP, SigLIP): vitlab's towers, logits and tokenizers against transformers' on tiny
random models, the OpenCLIP layout, the Hub round trip and the one-line errors."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

import vitlab
from vitlab.errors import InvalidValueError, VitlabError
from vitlab.models.text import TextConfig, TextTransformer

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


def _clip(tmp_path, eos_token_id=98, projection_dim=24, act="quick_gelu", vocab_size=99, vision_heads=2):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(text_config={**TEXT, "eos_token_id": eos_token_id, "bos_token_id": 97, "pad_token_id": 0,
                                  "hidden_act": act, "vocab_size": vocab_size},
                     vision_config={**VISION, "hidden_act": act, "num_attention_heads": vision_heads},
                     projection_dim=projection_dim)
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
    from safetensors.torch import load_file, save_file

    ref, folder = _clip(tmp_path, eos_token_id=2)  # configs written before transformers#24773
    # and, as checkpoints saved before transformers 4.31 do, the position_ids index buffers among the weights
    weights = load_file(folder / "model.safetensors")
    weights["text_model.embeddings.position_ids"] = torch.arange(16).unsqueeze(0)
    weights["vision_model.embeddings.position_ids"] = torch.arange(17).unsqueeze(0)
    save_file(weights, folder / "model.safetensors")
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


# ------------------------------------------------------------------------------------------------- tokenizers
CORPUS = ["a photo of a cat", "a photo of a dog", "an origami crane folded from paper",
          "the quick brown fox jumps over the lazy dog", "photos of cats and dogs"] * 3


def _clip_tokenizer(folder, max_length=16):
    """A tiny byte-level BPE built as CLIP's tokenizer.json is (lowercased, ``</w>`` word ends, bos / eos)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    split = Regex(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(split, behavior="removed", invert=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|startoftext|>", "<|endoftext|>"], end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.post_processor = processors.RobertaProcessing(("<|endoftext|>", 1), ("<|startoftext|>", 0),
                                                      trim_offsets=False, add_prefix_space=False)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    return tok.get_vocab_size()


def _spiece(folder, max_length=16, model_type="unigram"):
    """A tiny SentencePiece model with SigLIP's special tokens (``</s>`` = 1 ends and pads)."""
    import sentencepiece

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buffer, vocab_size=60, model_type=model_type, pad_id=0,
        eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", minloglevel=2,
        hard_vocab_limit=False)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(buffer.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "SiglipTokenizer", "model_max_length": max_length, "eos_token": "</s>",
        "pad_token": "</s>", "unk_token": "<unk>", "do_lower_case": True}))


def _gemma(folder, tokenizer_class, extra):
    """A tiny Gemma-style tokenizer.json (byte-fallback BPE, ``▁`` for spaces, ``<bos>`` first) as SigLIP 2's."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                                        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": tokenizer_class, "model_max_length": 16, "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", **extra}))


TOKENIZE = ["a photo of a cat.", "A PHOTO of   a dog!", "an origami crane, folded from paper", "x",
            "the quick brown fox jumps over the lazy dog " * 4, "Zürich café naïve", "under_score ▁odd", "",
            "{} braces </s> tag", "cat <unk> dog", "a </s> , b", "<|endoftext|> then <eos>"]


def _reference_ids(folder, cls=None):
    from transformers import AutoTokenizer

    tok = (cls or AutoTokenizer).from_pretrained(folder)
    return tok(TOKENIZE, padding="max_length", truncation=True, max_length=16, return_tensors="pt").input_ids


def test_clip_tokenizer_json_ids_equal_transformers_clip_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    from vitlab.models.tokenizer import load_tokenizer

    _clip_tokenizer(tmp_path / "tok")
    ids = load_tokenizer(tmp_path / "tok", 16)(TOKENIZE)
    assert ids.shape == (len(TOKENIZE), 16) and ids.dtype == torch.long
    assert torch.equal(ids, _reference_ids(tmp_path / "tok", CLIPTokenizer))
    assert ids[4, -1] == 1 and ids[3, 3:].eq(1).all()  # truncated with <|endoftext|> kept last; padded with it


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_siglip_sentencepiece_ids_equal_transformers_siglip_tokenizer(tmp_path, model_type):
    from transformers import SiglipTokenizer

    from vitlab.models.tokenizer import load_tokenizer

    _spiece(tmp_path / "tok", model_type=model_type)
    ids = load_tokenizer(tmp_path / "tok", 16)(TOKENIZE)
    assert torch.equal(ids, _reference_ids(tmp_path / "tok", SiglipTokenizer))
    # canonicalised: case, punctuation and runs of spaces make no difference
    assert torch.equal(ids[0], load_tokenizer(tmp_path / "tok", 16)(["A  Photo, of a CAT"])[0])


@pytest.mark.parametrize("cls, extra", [("GemmaTokenizer", {"padding_side": "right"}), ("Siglip2Tokenizer", {}),
                                        ("GemmaTokenizer", {"add_bos_token": False, "add_eos_token": True})])
def test_gemma_tokenizer_json_ids_equal_transformers(tmp_path, cls, extra):
    from vitlab.models.tokenizer import load_tokenizer

    _gemma(tmp_path / "tok", cls, extra)
    ids = load_tokenizer(tmp_path / "tok", 16)(TOKENIZE)
    assert torch.equal(ids, _reference_ids(tmp_path / "tok"))


def test_tokenize_through_the_model_gives_transformers_zero_shot_logits(tmp_path):
    from transformers import CLIPTokenizer

    ref, folder = _clip(tmp_path, eos_token_id=1, vocab_size=300)
    assert _clip_tokenizer(folder) == 300
    model = vitlab.load_image_text(folder, tokenizer=False)
    assert model.tokenizer is None
    with pytest.raises(VitlabError, match="no tokenizer"):
        model.tokenize(["a cat"])
    model = vitlab.load_image_text(folder)
    texts = ["a photo of a cat", "a photo of a dog", "an origami crane"]
    tokens = model.tokenize(texts)
    reference = CLIPTokenizer.from_pretrained(folder)(texts, padding=True, return_tensors="pt")  # shortest padding
    assert torch.equal(tokens, model.tokenizer(texts)) and tokens.shape == (3, 16)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref(pixel_values=images, **reference).logits_per_image
        torch.testing.assert_close(model(images, tokens), expected, rtol=1e-5, atol=1e-5)
        assert torch.allclose(model(images, tokens).softmax(-1).sum(-1), torch.ones(2))


# ------------------------------------------------------------------------------------------------- OpenCLIP layout
def _to_open_clip(sd: dict) -> dict:
    """transformers CLIPModel tensors -> the names and shapes OpenAI CLIP / OpenCLIP state dicts use."""
    out = {}
    for tower, prefix in (("text_model.", ""), ("vision_model.", "visual.")):
        layers = sorted({int(k.split(".")[3]) for k in sd if k.startswith(f"{tower}encoder.layers.")})
        for i in layers:
            src, dst = f"{tower}encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                out[f"{dst}attn.in_proj_{kind}"] = torch.cat([sd[f"{src}self_attn.{w}_proj.{kind}"] for w in "qkv"])
                out[f"{dst}attn.out_proj.{kind}"] = sd[f"{src}self_attn.out_proj.{kind}"]
                out[f"{dst}ln_1.{kind}"], out[f"{dst}ln_2.{kind}"] = sd[f"{src}layer_norm1.{kind}"], \
                    sd[f"{src}layer_norm2.{kind}"]
                out[f"{dst}mlp.c_fc.{kind}"], out[f"{dst}mlp.c_proj.{kind}"] = sd[f"{src}mlp.fc1.{kind}"], \
                    sd[f"{src}mlp.fc2.{kind}"]
    out["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    out["text_projection"] = sd["text_projection.weight"].t().contiguous()
    out["visual.conv1.weight"] = sd["vision_model.embeddings.patch_embedding.weight"]
    out["visual.class_embedding"] = sd["vision_model.embeddings.class_embedding"]
    out["visual.positional_embedding"] = sd["vision_model.embeddings.position_embedding.weight"]
    out["visual.proj"] = sd["visual_projection.weight"].t().contiguous()
    for kind in ("weight", "bias"):
        out[f"ln_final.{kind}"] = sd[f"text_model.final_layer_norm.{kind}"]
        out[f"visual.ln_pre.{kind}"] = sd[f"vision_model.pre_layrnorm.{kind}"]
        out[f"visual.ln_post.{kind}"] = sd[f"vision_model.post_layernorm.{kind}"]
    out["logit_scale"] = sd["logit_scale"]
    return {k: v.contiguous() for k, v in out.items()}


@pytest.mark.parametrize("quick", [True, False])
def test_open_clip_layout_equals_the_transformers_layout_of_the_same_weights(tmp_path, quick):
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel

    wide = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)  # 64-wide heads
    act = "quick_gelu" if quick else "gelu"
    ref = CLIPModel(CLIPConfig(text_config={**TEXT, **wide, "hidden_act": act, "eos_token_id": 98},
                               vision_config={**VISION, **wide, "hidden_act": act}, projection_dim=24)).eval()
    _randomise(ref, seed=3)
    folder = tmp_path / "open_clip"
    folder.mkdir()
    save_file(_to_open_clip(ref.state_dict()), folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 24, "quick_gelu": quick, "vision_cfg": {"image_size": 32, "layers": 2, "width": 128,
                                                             "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 99, "width": 128, "heads": 2, "layers": 2}},
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}}))
    model = vitlab.load_image_text(folder)
    pre = model.preprocessing
    assert pre.mean == (0.5,) * 3 and pre.std == (0.25,) * 3 and pre.interpolation == "bilinear"
    assert model.text.cfg.pool == "argmax" and model.text.cfg.gelu == ("quick" if quick else "exact")
    assert model.visual.cfg.gelu == model.text.cfg.gelu
    tokens, mask = _padded_tokens(eos=98)  # OpenCLIP pools the highest id: the end-of-text token is the largest
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = ref(input_ids=tokens, attention_mask=mask, pixel_values=images)
        torch.testing.assert_close(model(images, tokens), out.logits_per_image, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(tokens), out.text_embeds, rtol=1e-5, atol=1e-5)
        # the same file on its own (no config beside it) is read the same way when it is OpenAI's QuickGELU release
        lone = tmp_path / "lone.safetensors"
        lone.write_bytes((folder / "open_clip_model.safetensors").read_bytes())
        if quick:
            torch.testing.assert_close(vitlab.load_image_text(lone)(images, tokens), out.logits_per_image,
                                       rtol=1e-5, atol=1e-5)
        else:  # a file whose config does not say: gelu= sets both towers
            forced = vitlab.load_image_text(lone, gelu="exact")
            assert forced.visual.cfg.gelu == forced.text.cfg.gelu == "exact"
            torch.testing.assert_close(forced(images, tokens), out.logits_per_image, rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidValueError, match="gelu='relu': choose one of exact, tanh, quick"):
        vitlab.load_image_text(folder, gelu="relu")


def test_a_transformers_weights_file_without_its_config(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    wide = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2)  # 64-wide heads
    ref = CLIPModel(CLIPConfig(text_config={**TEXT, **wide, "eos_token_id": 98},
                               vision_config={**VISION, **wide}, projection_dim=24)).eval()
    _randomise(ref, seed=4)
    ref.save_pretrained(tmp_path / "clip")
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((tmp_path / "clip" / "model.safetensors").read_bytes())
    model = vitlab.load_image_text(lone)
    assert model.text.cfg.num_heads == 2 and any("no config.json: 2 text heads assumed" in n for n in model.notes)
    tokens, mask = _padded_tokens(eos=98)  # the default eos id is outside this vocabulary: the highest id is pooled
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref(input_ids=tokens, attention_mask=mask, pixel_values=images).logits_per_image
        torch.testing.assert_close(model(images, tokens), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------- the Hub
def test_saved_folder_through_a_loopback_hub_loads_as_the_folder_does(tmp_path, monkeypatch):
    from tests.hub_fixtures import LoopbackHub, offline_hub_cache

    hub = offline_hub_cache(tmp_path, monkeypatch)
    ref, folder = _siglip(tmp_path)
    _spiece(folder)
    saved = tmp_path / "saved"
    assert vitlab.save_image_text(vitlab.load_image_text(folder), saved) == ["written as transformers SiglipModel"]
    files = {p.name: p.read_bytes() for p in saved.iterdir() if p.is_file()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "spiece.model",
            "tokenizer_config.json"} <= set(files)
    server = LoopbackHub({"google/tiny-siglip": files})
    try:
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        model = vitlab.load_image_text("hf-hub:google/tiny-siglip")
    finally:
        server.stop()
    snapshot = hub / "models--google--tiny-siglip" / "snapshots" / server.commit
    assert (snapshot / "spiece.model").is_file() and (snapshot / "tokenizer_config.json").is_file()
    local = vitlab.load_image_text(folder)
    tokens = local.tokenize(["a photo of a cat", "a dog"])
    assert torch.equal(model.tokenize(["a photo of a cat", "a dog"]), tokens) and tokens.shape == (2, 16)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images, tokens), local(images, tokens), rtol=0, atol=0)
        torch.testing.assert_close(model(images, tokens), ref(input_ids=tokens, pixel_values=images).logits_per_image,
                                   rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # now in the cache: no network needed
    assert vitlab.load_image_text("hf-hub:google/tiny-siglip").tokenizer is not None


def test_an_open_clip_repo_without_config_json_loads_from_the_hub(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from tests.hub_fixtures import LoopbackHub, offline_hub_cache

    offline_hub_cache(tmp_path, monkeypatch)
    # OpenCLIP pools the highest token id (its end-of-text token has the largest id; not so in this tiny
    # vocabulary): transformers does the same with a legacy eos_token_id of 2. One 32-wide head in the image
    # tower: the head count OpenCLIP's 64-wide heads give for that width (its vision_cfg does not store it).
    ref, folder = _clip(tmp_path, eos_token_id=2, vocab_size=300, vision_heads=1)
    _clip_tokenizer(folder)
    save_file(_to_open_clip(ref.state_dict()), tmp_path / "open_clip_model.safetensors")
    config = {"model_cfg": {"embed_dim": 24, "quick_gelu": True,
                            "text_cfg": {"context_length": 16, "vocab_size": 300, "width": 32, "heads": 2}}}
    files = {"open_clip_model.safetensors": (tmp_path / "open_clip_model.safetensors").read_bytes(),
             "open_clip_config.json": json.dumps(config).encode(),
             "tokenizer.json": (folder / "tokenizer.json").read_bytes(),
             "tokenizer_config.json": (folder / "tokenizer_config.json").read_bytes()}
    timm_only = {"config.json": json.dumps({"architecture": "vit_base_patch16_clip_224"}).encode()}
    server = LoopbackHub({"laion/tiny-clip": files, "laion/empty": {"README.md": b"nothing"},
                          "timm/image-only": timm_only})
    try:
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        model = vitlab.load_image_text("hf-hub:laion/tiny-clip")
        with pytest.raises(VitlabError, match="hf-hub:laion/empty: the repo has no config.json"):
            vitlab.load_image_text("hf-hub:laion/empty")
        with pytest.raises(VitlabError, match="holds a timm image model, not a two-tower .* loads with vitlab.load"):
            vitlab.load_image_text("hf-hub:timm/image-only")
    finally:
        server.stop()
    assert model.text.cfg.num_heads == 2 and model.text.cfg.pool == "argmax"
    texts = ["a photo of a cat", "a dog"]
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref(pixel_values=images, input_ids=model.tokenize(texts)).logits_per_image
        torch.testing.assert_close(model(images, model.tokenize(texts)), expected, rtol=1e-5, atol=1e-5)


def test_save_image_text_writes_what_transformers_reads(tmp_path):
    from transformers import CLIPModel, SiglipModel

    ref, folder = _clip(tmp_path, eos_token_id=1, vocab_size=300)
    _clip_tokenizer(folder)
    model = vitlab.load_image_text(folder)
    vitlab.save_image_text(model, tmp_path / "out")
    again, back = vitlab.load_image_text(tmp_path / "out"), CLIPModel.from_pretrained(tmp_path / "out").eval()
    tokens, images = model.tokenize(["a photo of a cat", "a dog"]), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref(pixel_values=images, input_ids=tokens).logits_per_image
        torch.testing.assert_close(back(pixel_values=images, input_ids=tokens).logits_per_image, expected,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again(images, again.tokenize(["a photo of a cat", "a dog"])), expected,
                                   rtol=1e-5, atol=1e-5)
    # CLIP's processor stores the crop as whole pixels (shortest_edge 36 for 32 / 0.9)
    assert again.preprocessing.replace(crop_pct=0.9) == model.preprocessing
    assert again.preprocessing.crop_pct == pytest.approx(32 / 36)
    # a SigLIP pair trained from scratch is saved the same way
    fresh = vitlab.create_image_text("siglip_b16", img_size=32, embed_dim=32, depth=1, num_heads=2, mlp_dim=64,
                                     logit_bias=-10.0, text=TextConfig(vocab_size=50, context_length=8, embed_dim=32,
                                                                       depth=1, num_heads=2, mlp_dim=64, causal=False,
                                                                       pool="last", gelu="tanh", norm_eps=1e-6,
                                                                       proj_dim=32, proj_bias=True))
    vitlab.save_image_text(fresh, tmp_path / "fresh")
    tokens = torch.randint(0, 50, (3, 8))
    with torch.no_grad():
        torch.testing.assert_close(
            SiglipModel.from_pretrained(tmp_path / "fresh").eval()(pixel_values=images, input_ids=tokens)
            .logits_per_image, fresh(images, tokens), rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidValueError, match="SiglipModel's text tower is bidirectional"):
        vitlab.save_image_text(vitlab.create_image_text("siglip_b16", img_size=32, embed_dim=32, depth=1,
                                                        num_heads=2, mlp_dim=64), tmp_path / "no")
    assert not (tmp_path / "no").exists()


# ------------------------------------------------------------------------------------------------- fresh models
def test_create_image_text_from_configs_and_names():
    torch.manual_seed(0)
    vision = vitlab.ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_dim=64,
                              num_classes=24, pre_norm=True, patch_bias=False)
    text = TextConfig(vocab_size=50, context_length=8, embed_dim=32, depth=1, num_heads=2, mlp_dim=64, proj_dim=24)
    model = vitlab.create_image_text(vision, text)
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(0, 50, (3, 8))
    with torch.no_grad():
        logits = model(images, tokens)
        img = torch.nn.functional.normalize(model.visual(images), dim=-1)
        txt = torch.nn.functional.normalize(model.text(tokens), dim=-1)
        torch.testing.assert_close(logits, 10 * img @ txt.t(), rtol=1e-5, atol=1e-5)
    assert TextConfig.from_dict(text.to_dict()) == text
    siglip = vitlab.create_image_text("siglip_b16", img_size=32, embed_dim=32, depth=1, num_heads=2, mlp_dim=64,
                                      logit_bias=-10.0)
    assert siglip.text.cfg.embed_dim == 32 and not siglip.text.cfg.causal and siglip.text.cfg.context_length == 64
    with torch.no_grad():
        assert siglip(images, torch.randint(0, 32000, (3, 64))).shape == (2, 3)


# ------------------------------------------------------------------------------------------------- bad input
def test_bad_input_one_line_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(InvalidValueError, match="embed_dim 30 is not divisible by num_heads 4"):
        TextConfig(embed_dim=30, num_heads=4)
    with pytest.raises(InvalidValueError, match="unknown text config keys: width"):
        TextConfig.from_dict({"width": 3})
    tower = TextTransformer(TextConfig(vocab_size=10, context_length=4, embed_dim=8, depth=1, num_heads=2,
                                       mlp_dim=16, proj_dim=0))
    with pytest.raises(InvalidValueError, match=r"token ids must be in \[0, 10\)"):
        tower(torch.tensor([[1, 2, 10]]))
    with pytest.raises(InvalidValueError, match="length 5: the text tower reads 1 to 4"):
        tower(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(InvalidValueError, match="integer tensor"):
        tower(torch.zeros(1, 3))
    _, folder = _clip(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "vit"}))
    with pytest.raises(VitlabError, match="model_type 'vit' is not a two-tower image-text model"):
        vitlab.load_image_text(folder)
    (folder / "config.json").write_text(json.dumps(config))
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "text_model.final_layer_norm.bias"},
              folder / "model.safetensors")
    with pytest.raises(VitlabError, match=r"missing keys \(1\): norm\.bias") as info:
        vitlab.load_image_text(folder)
    assert "\n" not in str(info.value)
    save_file({k: v for k, v in weights.items() if not k.startswith("text_model.")}, folder / "model.safetensors")
    with pytest.raises(VitlabError, match="no text_model.* tensors; a vision-only checkpoint"):
        vitlab.load_image_text(folder)
    with pytest.raises(VitlabError, match="no such file or folder"):
        vitlab.load_image_text(tmp_path / "nothing")


def test_default_text_towers_have_the_published_sizes():
    """The text towers text_config_for gives CLIP B/16 and SigLIP B/16 have transformers' default CLIPModel /
    SiglipModel text parameter counts (63,428,096 and 110,271,744 with the projections)."""
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    from vitlab.image_text import text_config_for

    with torch.device("meta"):
        for name, ref in (("clip_b16_quickgelu", CLIPModel(CLIPConfig())),
                          ("siglip_b16", SiglipModel(SiglipConfig(text_config={"eos_token_id": 1,
                                                                               "bos_token_id": None})))):
            expected = sum(p.numel() for n, p in ref.named_parameters() if n.startswith("text_"))
            tower = TextTransformer(text_config_for(vitlab.get_config(name)))
            assert sum(p.numel() for p in tower.parameters()) == expected, name
