"""Two-tower image-text models (CLIP, SigLIP) by name or path: :func:`load_image_text` and
:func:`create_image_text`.

The hub turns a name into local files (the weights, ``config.json`` and the tokenizer's files); the image tower is
what :func:`vitlab.load` gives for the same source, and :mod:`vitlab.checkpoints.image_text` reads the text tower,
logit scale and bias beside it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoints.image_text import (
    image_text_files,
    open_clip_preprocessing,
    read_text_tower,
    write_image_text_folder,
)
from .compute.onednn import set_onednn_linear
from .errors import InvalidValueError, VitlabError
from .factory import create_model, load
from .hub import HUB_PREFIX, resolve
from .hub.hf import resolve_image_text
from .models import ViTConfig, get_config, model_from_config
from .models.image_text import LOG_10, ImageTextModel
from .models.pretrained import CATALOG, get_pretrained, is_pretrained_name
from .models.text import GELU_KINDS, TextConfig, TextTransformer
from .models.tokenizer import load_tokenizer

__all__ = ["catalog_image_text_repo", "create_image_text", "load_image_text", "save_image_text", "text_config_for"]


def load_image_text(source: str | os.PathLike, *, tokenizer: bool = True, gelu: str | None = None) -> ImageTextModel:
    """A CLIP / SigLIP checkpoint with both towers, in eval mode.

    ``source``: ``hf-hub:ORG/NAME[@REV]`` (a transformers ``CLIPModel`` / ``SiglipModel`` repo; its
    ``config.json``, weights and tokenizer files are fetched into the Hub cache), a local transformers folder, a
    folder of OpenCLIP files (``open_clip_config.json`` + ``open_clip_model.safetensors``), a big_vision two-tower
    ``.npz`` (SigLIP's own releases; its SentencePiece file beside it as ``spiece.model``), or one weights file
    (OpenAI CLIP / OpenCLIP or transformers names; a ``config.json`` / ``open_clip_config.json`` beside it describes
    it). The image tower is ``vitlab.load(source)``'s; the tokenizer is read from ``tokenizer.json`` or
    ``spiece.model`` beside the weights (``tokenizer=False``, or no such file: ``model.tokenizer`` is None and
    :meth:`~vitlab.models.image_text.ImageTextModel.tokenize` is refused). ``gelu`` (``quick``, ``exact``,
    ``tanh``): both towers' activation, for files whose config does not say it (an OpenCLIP release of OpenAI's
    weights without ``quick_gelu``); default: what the checkpoint's config says.

    >>> m = load_image_text("hf-hub:openai/clip-vit-base-patch16")          # doctest: +SKIP
    >>> probs = m(images, m.tokenize(["a photo of a cat", "a photo of a dog"])).softmax(-1)  # doctest: +SKIP
    """
    if gelu is not None and gelu not in GELU_KINDS:
        raise InvalidValueError(f"gelu={gelu!r}: choose one of {', '.join(GELU_KINDS)}")
    spec = os.fspath(source)
    repo = catalog_image_text_repo(spec)
    if repo is not None:  # a catalog name: the Hub repo of its publisher's model with both towers
        spec = HUB_PREFIX + repo
    if spec.startswith(HUB_PREFIX) and not Path(spec).exists():
        local = resolve_image_text(spec[len(HUB_PREFIX):])  # both towers' files and the tokenizer's
    else:
        resolved = resolve(spec)  # a URL or catalog name: an image-tower file (its text tower is looked for)
        local = Path(resolved.path) if resolved is not None else Path(spec)
    where, layout, oc_config = image_text_files(local)
    text = read_text_tower(local)
    if gelu is not None:
        text.config = text.config.replace(gelu=gelu)
        text.notes.append(f"GELU set to {gelu} (gelu=...)")
    if layout == "hf" and (where.is_dir() or local == Path(spec)):
        visual = load(spec, gelu=gelu)  # exactly vitlab.load's image tower
    else:  # OpenCLIP: the weights file itself, with the GELU and preprocessing its config names
        visual = load(where, gelu=gelu or text.gelu_image)
        visual.preprocessing = open_clip_preprocessing(visual.preprocessing, oc_config)
    folder = where if where.is_dir() else where.parent
    tok = load_tokenizer(folder, text.config.context_length) if tokenizer else None
    model = ImageTextModel(visual, text.build(str(where)), logit_scale=text.logit_scale,
                           logit_bias=text.logit_bias, tokenizer=tok, notes=text.notes)
    return set_onednn_linear(model.eval())  # this machine's CPU fast path, as vitlab.load


def catalog_image_text_repo(spec: str) -> str | None:
    """The transformers Hub repo with both towers of the catalog entry ``spec`` names (``clip_b16_quickgelu.openai``
    -> ``openai/clip-vit-base-patch16``); None when ``spec`` is not a catalog name. An entry without such a repo (an
    image-only model) is refused naming the entries that have one."""
    if Path(spec).exists() or not is_pretrained_name(spec):
        return None
    try:
        entry = get_pretrained(spec)
    except KeyError:
        return None
    if not entry.image_text:
        with_towers = ", ".join(e.name for e in CATALOG if e.image_text)
        raise VitlabError(f"{spec}: the catalog has no text tower for {entry.name} (an image model); catalog names "
                          f"with both towers: {with_towers}")
    return entry.image_text


def save_image_text(model: ImageTextModel, folder: str | os.PathLike) -> list[str]:
    """Write ``model`` as a transformers ``CLIPModel`` / ``SiglipModel`` folder (``config.json``,
    ``model.safetensors``, ``preprocessor_config.json`` and the tokenizer's files), replaced atomically:
    :func:`load_image_text` and transformers' ``from_pretrained`` read it, and it can be uploaded as a Hub repo.
    Returns notes. Raises InvalidValueError for towers neither class computes (named in the message)."""
    if not isinstance(model, ImageTextModel):
        raise InvalidValueError(f"save_image_text: expected a vitlab ImageTextModel, got a {type(model).__name__}")
    return write_image_text_folder(model, folder)


def text_config_for(vision: ViTConfig) -> TextConfig:
    """The text tower published with an image tower of this shape: SigLIP's (a MAP-pooled tower; the text tower
    has the image tower's width, depth, heads and MLP, a 32,000-token vocabulary, 64 positions, no causal mask, the
    last position pooled, a projection with bias) or CLIP's (49,408 tokens, 77 positions, causal, 512 wide with 8
    heads for a projection of 512, 768 / 12 for 768, the end-of-text token pooled, projected without bias)."""
    if vision.pool == "map":
        return TextConfig(vocab_size=32000, context_length=64, embed_dim=vision.embed_dim, depth=vision.depth,
                          num_heads=vision.num_heads, mlp_dim=vision.mlp_dim, causal=False, pool="last",
                          gelu="tanh", norm_eps=1e-6, proj_dim=vision.embed_dim, proj_bias=True, pad_id=1, eos_id=1)
    proj = vision.num_classes or vision.embed_dim
    width = 512 if proj <= 512 else 768
    return TextConfig(embed_dim=width, num_heads=width // 64, mlp_dim=4 * width, gelu=vision.gelu,
                      norm_eps=vision.norm_eps, proj_dim=proj, eos_id=49407, pad_id=49407)


def create_image_text(vision: str | ViTConfig, text: TextConfig | dict | None = None, *,
                      logit_scale: float = LOG_10, logit_bias: float | None = None, tokenizer=None,
                      **vision_overrides) -> ImageTextModel:
    """A two-tower model with fresh weights (tests, training from scratch): ``vision`` a registered image-tower
    name (``clip_b16``, ``siglip_b16``, any ViT; ``vision_overrides`` change its config fields) or a
    :class:`~vitlab.models.ViTConfig`; ``text`` a :class:`~vitlab.models.text.TextConfig` (or its dict; default:
    :func:`text_config_for` the image tower). ``logit_scale`` is the log of the scale (CLIP starts at log 10;
    SigLIP at log 10 with ``logit_bias=-10``)."""
    if isinstance(vision, ViTConfig):
        cfg = vision.replace(**vision_overrides) if vision_overrides else vision
        visual = set_onednn_linear(model_from_config(cfg))
    elif isinstance(vision, str):
        cfg = get_config(vision, **vision_overrides)
        visual = create_model(vision, **vision_overrides)
    else:
        raise InvalidValueError(f"create_image_text: vision must be a model name or a ViTConfig, got a "
                                f"{type(vision).__name__}")
    if text is None:
        text_cfg = text_config_for(cfg)
    elif isinstance(text, dict):
        text_cfg = TextConfig.from_dict(text)
    elif isinstance(text, TextConfig):
        text_cfg = text
    else:
        raise InvalidValueError(f"create_image_text: text must be a TextConfig or a dict, got a {type(text).__name__}")
    return set_onednn_linear(ImageTextModel(visual, TextTransformer(text_cfg), logit_scale=logit_scale,
                                            logit_bias=logit_bias, tokenizer=tokenizer))
