"""Zero-shot classification with an image-text model (CLIP, SigLIP): class names in, a classifier out.

Radford et al. 2021 (CLIP, section 3.1.2) classify without training: each class name is written into prompts ("a
photo of a {}."), the text tower embeds them, and an image's logits are its cosine similarities with the class
embeddings times the model's logit scale (SigLIP adds its logit bias; Zhai et al. 2023). Averaging the embeddings of
several prompts per class (prompt ensembling, section 3.1.4) adds a few points.

vitlab turns that into an ordinary classifier: the image tower with a head whose input is L2-normalised
(:class:`~vitlab.models.ViTConfig` ``head_l2_norm``, after CLIP's projection as ``head_proj``) and whose rows are the
class embeddings times the scale. The result is a :class:`~vitlab.models.VisionTransformer` like any other: it is
saved with :func:`vitlab.save`, evaluated, served, exported, and fine-tuned from its zero-shot head (a head started
from the text embeddings rather than zeros, as in WiSE-FT / FLYP-style fine-tuning of CLIP).
"""

from __future__ import annotations

import copy
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from .compute.onednn import set_onednn_linear
from .errors import InvalidValueError, VitlabError
from .image_text import load_image_text
from .models import VisionTransformer, metadata_of
from .models.image_text import embed_texts

__all__ = ["DEFAULT_TEMPLATES", "ENSEMBLE_TEMPLATES", "PromptHeads", "class_embeddings", "image_embedder",
           "prompt_head", "prompt_loss", "prompt_text", "zero_shot_classifier"]

#: the single prompt CLIP's paper recommends over the bare class name
DEFAULT_TEMPLATES = ("a photo of a {}.",)
#: a small prompt ensemble (each class's embedding is the mean of its prompts' unit embeddings, renormalised)
ENSEMBLE_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a close-up photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a drawing of a {}.",
)


def prompt_text(name: str) -> str:
    """How a class name reads inside a prompt: folder-style underscores become spaces (``ankle_boot`` -> ``ankle
    boot``)."""
    return " ".join(str(name).replace("_", " ").split())


def _check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    if isinstance(templates, str):
        templates = (templates,)
    templates = tuple(templates)
    if not templates:
        raise InvalidValueError("templates: give at least one prompt template", options=("templates",))
    for template in templates:
        if template.count("{}") != 1:
            raise InvalidValueError(f"template {template!r} must hold the class name's place as {{}} exactly once",
                                    options=("templates",))
    return templates


def _check_names(class_names: Sequence[str]) -> list[str]:
    names = [str(n) for n in class_names]
    if not names:
        raise InvalidValueError("class_names: give at least one class", options=("class_names",))
    empty = [i for i, n in enumerate(names) if not prompt_text(n)]
    if empty:
        raise InvalidValueError(f"class_names: class {empty[0]} has an empty name", options=("class_names",))
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise InvalidValueError(f"class_names: {name!r} is given twice (classes {seen[name]} and {i})",
                                    options=("class_names",))
        seen[name] = i
    return names


@torch.no_grad()
def class_embeddings(model, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                     batch_size: int = 256) -> torch.Tensor:
    """(K, P) unit text embeddings of the classes (float32, on the CPU): each class name in every template, embedded
    by ``model``'s text tower (normalised, :func:`~vitlab.models.image_text.embed_texts`), averaged over the
    templates and normalised again. ``model`` is an image-text model (:func:`vitlab.load_image_text`) with a
    tokenizer."""
    names = _check_names(class_names)
    templates = _check_templates(templates)
    texts = [template.format(prompt_text(name)) for name in names for template in templates]
    per_prompt = embed_texts(model, texts, batch_size).reshape(len(names), len(templates), -1)
    return torch.nn.functional.normalize(per_prompt.mean(dim=1), dim=-1)


def _projection(visual: VisionTransformer, source: str) -> torch.Tensor | None:
    """The image tower's projection into the shared space as a (P, D) matrix, or None when the tower's pooled
    output is the shared space already (SigLIP). vitlab loads CLIP's projection as the tower's head with a zero
    bias; a zero-shot classifier moves it to ``head_proj``."""
    cfg = visual.cfg
    if cfg.head_proj_dim:
        return visual.head_proj.weight.detach()
    if cfg.num_classes == 0:
        return None
    bias = visual.head.bias
    if bias is not None and bool(bias.detach().any()):
        raise VitlabError(f"{source}: the image tower's head has a bias, so it is a classifier rather than a "
                          "projection into the text space; zero-shot classification needs the image-text model's "
                          "own tower")
    return visual.head.weight.detach()


def _tower(model, num_classes: int, head: dict[str, torch.Tensor] | None, share: bool) -> VisionTransformer:
    """The image tower of ``model`` rebuilt with the projection in ``head_proj``, the L2 norm, and ``num_classes``
    outputs whose head tensors are ``head`` (none: unit embeddings out). ``share``: the new model uses the tower's
    tensors (no copy) instead of its own."""
    visual = model.visual
    source = str(getattr(model, "source", None) or "the image-text model")
    proj = _projection(visual, source)
    width = proj.shape[0] if proj is not None else visual.head_in_features
    text_width = getattr(getattr(getattr(model, "text", None), "cfg", None), "out_dim", width)
    if text_width != width:
        raise VitlabError(f"{source}: the text embeddings have {text_width} dimensions but the image tower gives "
                          f"{width}")
    cfg = visual.cfg.replace(num_classes=num_classes, head_proj_dim=0 if proj is None else proj.shape[0],
                             head_l2_norm=True)
    state = {k: v for k, v in visual.state_dict().items() if not k.startswith(("head.", "head_proj."))}
    weight = visual.patch_embed.proj.weight
    if proj is not None:
        state["head_proj.weight"] = proj if share else proj.clone()
    state.update({k: v.to(weight) for k, v in (head or {}).items()})
    with torch.device("meta"):
        tower = type(visual)(cfg)
    if not share:
        state = {k: v.clone() for k, v in state.items()}
    tower.load_state_dict(state, strict=True, assign=True)
    for name, buffer in visual.named_buffers():  # buffers left out of the state dict (fixed position tables)
        if name not in state:
            owner, _, leaf = name.rpartition(".")
            tower.get_submodule(owner).register_buffer(leaf, buffer if share else buffer.clone(), persistent=False)
    tower.eval()
    tower.preprocessing = copy.deepcopy(metadata_of(visual).preprocessing)
    return set_onednn_linear(tower)  # this machine's CPU fast path, as vitlab.load gives models


@torch.no_grad()
def prompt_head(model, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The (weight (K, P), bias (K,)) of the zero-shot head of ``class_names``: the class embeddings
    (:func:`class_embeddings`) times the model's logit scale, and its logit bias (SigLIP) or zeros. On unit image
    embeddings ``x``, ``x @ weight.T + bias`` are the image-text model's logits against the class prompts."""
    text = class_embeddings(model, class_names, templates, batch_size)
    scale = model.logit_scale.detach().float().exp().to(text.device)
    bias = getattr(model, "logit_bias", None)
    bias = (bias.detach().float().reshape(()).expand(len(text)).clone() if bias is not None
            else torch.zeros(len(text))).to(text.device)
    return scale * text, bias


def image_embedder(model) -> VisionTransformer:
    """The image tower of an image-text model as a model whose output is the unit image embedding (B, P): the
    tower, its projection (CLIP) and the L2 norm, no classes. It shares the tower's tensors (no copy)."""
    return _tower(model, 0, None, share=True)


@torch.no_grad()
def zero_shot_classifier(model, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                         batch_size: int = 256) -> VisionTransformer:
    """A classifier of ``class_names`` from an image-text model (an :class:`~vitlab.models.ImageTextModel` or
    anything :func:`vitlab.load_image_text` reads: ``hf-hub:openai/clip-vit-base-patch16``, a folder, a file),
    without training.

    Returns the image tower (a copy) whose head is :func:`prompt_head`: its logits equal the image-text model's
    ``logits_per_image`` against the class prompts. ``class_names`` become the model's class names; its loss is
    ``"sigmoid"`` for a model trained with the sigmoid loss (SigLIP: per-class probabilities), else ``"softmax"``.
    """
    names = _check_names(class_names)
    if isinstance(model, (str, os.PathLike)):
        model = load_image_text(model)
    weight, bias = prompt_head(model, names, templates, batch_size)
    classifier = _tower(model, len(names), {"head.weight": weight, "head.bias": bias}, share=False)
    classifier.class_names = names
    classifier.loss = prompt_loss(model)
    return classifier


def prompt_loss(model) -> str:
    """``"sigmoid"`` for an image-text model trained with the sigmoid loss (it has a logit bias: SigLIP), else
    ``"softmax"`` (CLIP)."""
    return "sigmoid" if getattr(model, "logit_bias", None) is not None else "softmax"


class PromptHeads:
    """Zero-shot heads for class lists named at run time (``vitlab serve --zero-shot``: each request names its
    labels): :func:`prompt_head` of an image-text model, cached for the ``cache_size`` most recent (labels,
    templates), safe to call from several threads. ``templates`` are the default prompts; ``loss`` says how the
    logits become probabilities (:func:`prompt_loss`)."""

    def __init__(self, model, templates: Sequence[str] = DEFAULT_TEMPLATES, cache_size: int = 64):
        self.model = model
        self.templates = _check_templates(templates)
        self.loss = prompt_loss(model)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, labels: Sequence[str], templates: Sequence[str] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (K, P), bias (K,)) of the head of ``labels`` in ``templates`` (default: this object's), on the
        CPU in float32."""
        key = (tuple(_check_names(labels)), self.templates if templates is None else _check_templates(templates))
        with self._lock:  # one text-tower pass at a time; a repeated list is answered from the cache
            head = self._cache.get(key)
            if head is None:
                head = tuple(t.float().cpu() for t in prompt_head(self.model, *key))
                self._cache[key] = head
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
        return head
