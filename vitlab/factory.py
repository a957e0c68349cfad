"""The factory: models by name, with or without pre-trained weights, and checkpoints by path or by name.

It composes the layers below it, each of which knows nothing of the others: :mod:`vitlab.hub` turns a name (catalog
entry, ``hf-hub:`` repo, URL) into a local file and what its source says; :mod:`vitlab.checkpoints` reads a file and
builds the model; :mod:`vitlab.compute` gives the model's Linear layers this machine's CPU fast path
(:func:`vitlab.compute.set_onednn_linear`). ``vitlab.create_model``, ``vitlab.load``, ``vitlab.read_checkpoint``,
``vitlab.inspect_checkpoint``, ``vitlab.convert`` and ``vitlab.push_to_hub`` (the model as a Hub repo's files, then
uploaded) are the functions here.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from torch import nn

from .checkpoints import Checkpoint, check_conversion, convert_checkpoint, describe_checkpoint, model_from_checkpoint
from .checkpoints import read_checkpoint as read_file
from .checkpoints.adapter import adapter_document, base_candidates, check_base_hash
from .checkpoints.files import run_folder_model
from .checkpoints.hub_layout import HUB_LAYOUTS, model_card, timm_hub_config, write_hub_folder
from .checkpoints.loading import adapted_model, read_adapter
from .checkpoints.vitlab_format import unwrap_module
from .compute.onednn import set_onednn_linear
from .errors import InvalidValueError, VitlabError
from .hub import get_pretrained, resolve
from .hub.upload import check_repo_id, upload_folder
from .models import create_model as create_fresh
from .models.lora import merge_lora

__all__ = ["checkpoint_location", "convert", "create_model", "hub_folder", "inspect_checkpoint", "load", "load_lora",
           "push_to_hub", "read_checkpoint"]


def read_checkpoint(spec: str | os.PathLike, *, model_name: str | None = None, prefer_ema: bool = False,
                    grid_hint: tuple[int, int] | None = None, check_finite: bool = True) -> Checkpoint:
    """:func:`vitlab.checkpoints.read_checkpoint` of a path or of a name: a catalog name, ``hf-hub:`` repo or URL is
    resolved to its (cached) file first, and what its source says (preprocessing, class names) is applied; a vitlab
    training run folder stands for the model it saved."""
    spec = run_folder_model(spec) or spec
    resolved = resolve(os.fspath(spec))
    document = adapter_document(resolved.path if resolved is not None else spec)
    base = find_adapter_base(spec, document) if document is not None else None  # a LoRA adapter: its base
    return read_file(spec, model_name=model_name, prefer_ema=prefer_ema, grid_hint=grid_hint,
                     check_finite=check_finite, source=resolved, base=base)


def checkpoint_location(spec: str | os.PathLike) -> Path:
    """The local file or folder a checkpoint spec (a path, a catalog name, an ``hf-hub:`` name, a URL) stands for,
    names resolved as :func:`read_checkpoint` resolves them (fetched when not cached)."""
    spec = run_folder_model(spec) or spec
    resolved = resolve(os.fspath(spec))
    return Path(resolved.path) if resolved is not None else Path(spec)


def find_adapter_base(adapter: str | os.PathLike, document: dict,
                      base: str | os.PathLike | None = None) -> tuple[Path, Checkpoint]:
    """(local path, record) of an adapter file's base: ``base`` when given, else the first of the recorded name (a
    path, catalog or ``hf-hub:`` name), the recorded path and a file of that name beside the adapter that exists.
    Its sha256 is checked before it is read (a different one is refused in one line naming both)."""
    source, tried = str(adapter), []
    for spec in base_candidates(document, source, base):
        try:
            path = checkpoint_location(spec)
        except VitlabError as exc:  # an unknown name, or not in the cache while offline
            tried.append(f"{spec} ({exc})")
            continue
        if path.exists():
            check_base_hash(document, source, path)
            return path, read_checkpoint(spec)
        tried.append(spec)
    raise VitlabError(f"{source}: cannot find the adapter's base checkpoint {document['base']['name']} (tried "
                      f"{', '.join(tried)}); pass where it is (base=...)")


def load_lora(path: str | os.PathLike, *, base: str | os.PathLike | None = None, merge: bool = False) -> nn.Module:
    """An adapter file's model in eval mode: with ``merge=False`` the adapters stay separate ``peft`` layers (to
    inspect them, or train on); with ``merge=True`` they are folded into the weights (what :func:`load` returns).
    ``base``: where the base checkpoint is, when it is no longer where the adapter file says (its sha256 must still
    match)."""
    tensors, document = read_adapter(path)
    base_path, base_ckpt = find_adapter_base(path, document, base)
    model = adapted_model(str(path), tensors, document, base_path, base_ckpt)
    return set_onednn_linear(merge_lora(model) if merge else model)  # this machine's CPU fast path, as load


def inspect_checkpoint(spec: str | os.PathLike, *, model_name: str | None = None, prefer_ema: bool = False) -> dict:
    """:func:`vitlab.checkpoints.inspect_checkpoint` of a path or of a name (the cached file is described)."""
    return describe_checkpoint(read_checkpoint(spec, model_name=model_name, prefer_ema=prefer_ema))


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, to: str, img_size=None, num_classes: int | None = None,
            model_name: str | None = None, resample: str | None = None, drop_pre_logits: bool = False,
            gelu: str | None = None, prefer_ema: bool = False, patch_size=None) -> dict:
    """:func:`vitlab.checkpoints.convert` from a path or from a name (a catalog name, ``hf-hub:`` repo or URL)."""
    check_conversion(src, dst, to)
    ckpt = read_checkpoint(src, model_name=model_name, prefer_ema=prefer_ema)
    return convert_checkpoint(ckpt, src, dst, to=to, img_size=img_size, num_classes=num_classes,
                              model_name=model_name, resample=resample, drop_pre_logits=drop_pre_logits, gelu=gelu,
                              patch_size=patch_size)


def load(path: str | os.PathLike, *, model_name: str | None = None, img_size=None, num_classes: int | None = None,
         resample: str | None = None, drop_pre_logits: bool = False, gelu: str | None = None,
         prefer_ema: bool = False, in_chans: int | None = None, patch_size=None) -> nn.Module:
    """Load any supported checkpoint (vitlab ``.safetensors`` or a vitlab training run folder, vit_jax / big_vision
    ``.npz``, timm / Hugging Face / torchvision state dicts as ``.safetensors`` or ``torch.save`` files, or a Hugging
    Face model folder), by path or by name (a catalog name, ``hf-hub:`` repo or URL: see :mod:`vitlab.hub`), and
    return the model in eval mode, with ``model.preprocessing`` and ``model.class_names`` set.

    - ``model_name``: a registered name; supplies what a layout does not store and is checked against the weights.
      A resolution alias (``vit_base_patch16_384``) also sets the target image size.
    - ``img_size``: build the model at this resolution (int or (height, width)); the position embedding is resampled
      with ``resample`` (``bilinear_aligned``, default for npz; ``bicubic``, default otherwise; ``bilinear``;
      ``nearest``).
    - ``num_classes``: a new zero-initialised head when it differs from the checkpoint's; ``drop_pre_logits`` removes
      the pre-logits layer too (the paper's fine-tuning set-up).
    - ``gelu``: ``"exact"`` or ``"tanh"``; default: what the source used (tanh for npz, the saved config for vitlab
      files, exact for timm / HF / torchvision).
    - ``prefer_ema``: take the EMA weights of a training checkpoint that holds both.
    - ``in_chans``: take images with this many channels; the input convolution is adapted as timm's
      ``adapt_input_conv`` does (summed for 1 channel, repeated and rescaled for more; see
      :mod:`vitlab.checkpoints.channels`) and the preprocessing's mean / std follow.
    - ``patch_size``: build the model with this patch size (int or (height, width)), the patch-embedding kernel
      resampled as FlexiViT does (pseudo-inverse of the patch resize, timm's ``resample_patch_embed``) and the
      position embedding resampled to the new grid (a /16 checkpoint as a /8 model at the same resolution).

    The model's Linear layers take this machine's CPU fast-path default (:func:`vitlab.compute.set_onednn_linear`).
    """
    ckpt = read_checkpoint(path, model_name=model_name, prefer_ema=prefer_ema)
    model = model_from_checkpoint(ckpt, model_name=model_name, img_size=img_size, num_classes=num_classes,
                                  resample=resample, drop_pre_logits=drop_pre_logits, gelu=gelu, in_chans=in_chans,
                                  patch_size=patch_size)
    return set_onednn_linear(model)  # this machine's CPU fast-path default, as vitlab.create_model


def create_model(name: str, pretrained: bool | str = False, **overrides):
    """A registered model, freshly initialised (``pretrained=False``) or with pre-trained weights from the catalog:
    ``pretrained=True`` loads the model's default tag (:data:`vitlab.hub.DEFAULT_TAGS`), a string loads that tag, and
    a name with a tag (``vit_b16.augreg_in21k``) loads that entry. With weights, ``img_size`` resamples the position
    embedding and ``num_classes`` puts a new zero-initialised head on (dropping the pre-logits layer, as the paper
    fine-tunes); other overrides are the loader's keywords (``resample``, ``gelu``). The Linear layers take this
    machine's CPU fast-path default (:func:`vitlab.compute.set_onednn_linear`: oneDNN where it measured faster;
    ``VITLAB_ONEDNN_LINEAR`` or ``set_onednn_linear(model, True / False)`` decides instead).

    >>> model = create_model("vit_b16", pretrained=True)                      # doctest: +SKIP
    >>> model = create_model("vit_b16", pretrained="augreg_in21k", num_classes=10, img_size=384)  # doctest: +SKIP
    """
    model, _, tag = name.partition(".")
    if not pretrained:  # a tagged name without pretrained=True builds the architecture alone (as timm does)
        # with the CPU fast path for its Linear layers, as vitlab.load gives it
        return set_onednn_linear(create_fresh(model if tag else name, **overrides))
    entry = get_pretrained(name if tag else model, None if pretrained is True else str(pretrained))
    allowed = {"img_size", "num_classes", "resample", "gelu", "drop_pre_logits"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise InvalidValueError(f"create_model({name!r}, pretrained=...): {', '.join(unknown)} cannot change with "
                          f"pre-trained weights; allowed: {', '.join(sorted(allowed))}")
    num_classes = overrides.pop("num_classes", None)
    if num_classes is not None and num_classes != entry.num_classes:
        overrides.setdefault("drop_pre_logits", True)
    return load(entry.name, num_classes=num_classes, **overrides)


def _run_documents(folder: Path) -> dict:
    """A training run folder's ``config.json`` and ``result.json`` (what the model card quotes); a missing or
    unreadable one is left out."""
    out = {}
    for key, name in (("config", "config.json"), ("result", "result.json")):
        try:
            document = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(document, dict):
            out[key] = document
    return out


def _model_for_hub(model_or_path) -> tuple[nn.Module, str | None, dict | None, str | None]:
    """(model, source spec, run documents, licence) of what :func:`push_to_hub` was given."""
    if isinstance(model_or_path, nn.Module):
        model = unwrap_module(model_or_path)  # DDP / FSDP / torch.compile wrappers: the model's own names
        if not hasattr(model, "cfg"):
            raise InvalidValueError(f"push_to_hub: a {type(model).__name__} is not a vitlab model (it has no cfg); "
                                    "pass a vitlab model or a checkpoint path")
        return model, None, None, None
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise InvalidValueError(f"push_to_hub: expected a vitlab model, a checkpoint path or name or a run folder, "
                                f"got a {type(model_or_path).__name__}")
    spec = os.fspath(model_or_path)
    run = _run_documents(Path(spec)) if run_folder_model(spec) is not None else None
    ckpt = read_checkpoint(spec)
    licence = None
    if ckpt.facts.get("catalog_name"):
        licence = get_pretrained(ckpt.facts["catalog_name"]).license
    return set_onednn_linear(model_from_checkpoint(ckpt)), spec, run, licence


def hub_folder(model_or_path, out: str | os.PathLike, *, repo_id: str, layout: str = "auto",
               license: str | None = None) -> dict:
    """Write the files :func:`push_to_hub` uploads into folder ``out`` (replaced atomically), without uploading:
    the weights in ``layout`` and a model card for ``repo_id``. Returns ``folder``, ``layout`` (``auto`` resolved),
    ``files`` and the layout writer's ``notes``."""
    if layout not in ("auto", *HUB_LAYOUTS):
        raise InvalidValueError(f"layout={layout!r}: choose one of auto, {', '.join(HUB_LAYOUTS)}")
    check_repo_id(repo_id)
    model, source, run, known_licence = _model_for_hub(model_or_path)
    auto_note = []
    if layout == "auto":  # timm's when it holds the model (timm and vitlab both read it), else vitlab's own
        try:
            timm_hub_config(model)
            layout = "timm"
        except InvalidValueError as exc:
            layout = "vitlab"
            auto_note = [f"vitlab layout: {str(exc).removesuffix(' (use the vitlab layout)')}"]
    card = model_card(model, repo_id, layout, run=run, license=license or known_licence,
                      source=Path(source).name if source else None)
    metadata = {"pushed_from": Path(source).name} if source else None
    notes = auto_note + write_hub_folder(model, out, layout, card=card, metadata=metadata)
    files = sorted(p.name for p in Path(out).iterdir() if p.is_file())
    return {"folder": str(out), "layout": layout, "files": files, "notes": notes}


def push_to_hub(model_or_path, repo_id: str, *, layout: str = "auto", private: bool = False,
                revision: str | None = None, commit_message: str | None = None, token: str | None = None,
                license: str | None = None) -> dict:
    """Share a model on the Hugging Face Hub as ``repo_id`` (``ORG/NAME``, created if new).

    ``model_or_path``: a loaded vitlab model, a checkpoint path or name (anything :func:`load` reads) or a training
    run folder (its final model; its data, recipe and test metrics go into the model card). ``layout``: ``"timm"``
    (``timm.create_model("hf-hub:ORG/NAME", pretrained=True)`` builds it), ``"hf"`` (transformers'
    ``AutoModelForImageClassification``), ``"vitlab"`` (any vitlab model) or ``"auto"`` (timm's where it holds the
    model, else vitlab's; the notes say why); ``vitlab.load("hf-hub:ORG/NAME")`` reads them all. A model card
    ``README.md`` goes with the weights. ``revision``: a branch (created when new); ``token``: default ``HF_TOKEN``
    or the stored login; ``HF_ENDPOINT`` picks the Hub. Returns the commit's ``commit_url`` and ``commit_oid``,
    ``repo_url``, ``revision``, the uploaded ``files``, the ``layout`` used and its ``notes``."""
    check_repo_id(repo_id, revision)
    with tempfile.TemporaryDirectory(prefix="vitlab-push-") as tmp:
        written = hub_folder(model_or_path, Path(tmp) / "repo", repo_id=repo_id, layout=layout, license=license)
        info = upload_folder(Path(tmp) / "repo", repo_id, private=private, revision=revision,
                             commit_message=commit_message, token=token)
    return {**info, "layout": written["layout"], "notes": written["notes"]}
