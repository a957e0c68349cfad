"""A model as the files of a Hugging Face Hub repo, in one of three layouts, with a model card (``README.md``).

- ``timm``: ``model.safetensors`` (a timm state dict, :func:`~.export.export_timm`) and timm's ``config.json``:
  ``architecture`` plus ``model_args`` (:func:`vitlab.models.timm_args.timm_architecture`), ``num_classes``,
  ``label_names`` and ``pretrained_cfg`` (input size, interpolation, crop, mean / std), which
  ``timm.create_model("hf-hub:...", pretrained=True)`` and vitlab's ``hf-hub:`` reader both build the model from;
- ``hf``: the transformers folder :func:`~.export.export_hf` writes (``AutoModelForImageClassification``);
- ``vitlab``: vitlab's own self-describing ``model.safetensors`` (any model vitlab has) next to a ``config.json``
  holding the same ``pretrained_cfg`` / ``label_names`` (what the Hub shows; vitlab reads the file's own).

Nothing here uploads: :mod:`vitlab.hub.upload` does, through the factory (:func:`vitlab.push_to_hub`).
"""

from __future__ import annotations

import json
import os
import shutil

from torch import nn

from ..atomic import atomic_directory
from ..errors import InvalidValueError
from ..models import has_tokens, metadata_of
from ..models.timm_args import timm_architecture
from ..preprocessing import Preprocessing
from .export import export_hf, export_timm
from .files import write_json
from .vitlab_format import save

HUB_LAYOUTS = ("timm", "hf", "vitlab")
# the library each layout is for: the model card's library_name (the Hub's "use this model" snippet) and a tag
LAYOUT_LIBRARY = {"timm": "timm", "hf": "transformers", "vitlab": "vitlab"}
CARD_CLASS_NAMES = 10  # class names listed in the card (the rest are counted)


def timm_pretrained_cfg(pre: Preprocessing, num_classes: int) -> dict:
    """timm's ``pretrained_cfg`` for a preprocessing: what ``timm.data.resolve_data_config`` reads."""
    crop = pre.resize == "crop"
    return {
        "input_size": [pre.channels, *pre.img_size],
        "interpolation": pre.interpolation,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "crop_pct": pre.crop_pct if crop else 1.0,
        "crop_mode": "center" if crop else "squash",
        "num_classes": num_classes,
        "fixed_input_size": True,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }


def timm_hub_config(model: nn.Module) -> dict:
    """timm's ``config.json`` for ``model`` (raises :class:`InvalidValueError` when timm cannot build it)."""
    cfg = model.cfg
    meta = metadata_of(model)
    architecture, model_args = timm_architecture(cfg)
    config = {"architecture": architecture, "num_classes": cfg.num_classes, "num_features": cfg.embed_dim,
              "global_pool": model_args["global_pool"], "model_args": model_args,
              "pretrained_cfg": timm_pretrained_cfg(meta.preprocessing, cfg.num_classes)}
    if meta.class_names:
        config["label_names"] = list(meta.class_names)
    return config


def write_hub_folder(model: nn.Module, folder: str | os.PathLike, layout: str, *, card: str,
                     metadata: dict | None = None) -> list[str]:
    """Write ``model`` in ``layout`` (one of :data:`HUB_LAYOUTS`) plus ``card`` as ``README.md`` into ``folder``
    (replaced atomically). Returns the layout writer's notes. Nothing is written when the layout cannot hold the
    model."""
    if layout not in HUB_LAYOUTS:
        raise InvalidValueError(f"layout={layout!r}: choose one of {', '.join(HUB_LAYOUTS)}")
    config = timm_hub_config(model) if layout == "timm" else None  # refuses before anything is written
    notes: list[str] = []
    with atomic_directory(folder) as tmp:
        if layout == "timm":
            notes = export_timm(model, tmp / "model.safetensors")
            write_json(tmp / "config.json", config)
        elif layout == "hf":
            notes = export_hf(model, tmp / "hf")
            for child in (tmp / "hf").iterdir():
                shutil.move(child, tmp / child.name)
            (tmp / "hf").rmdir()
        else:
            save(model, tmp / "model.safetensors", metadata=metadata)
            meta = metadata_of(model)
            num_classes = getattr(model.cfg, "num_classes", 0)
            vitlab_config = {"library_name": "vitlab", "num_classes": num_classes,
                             "pretrained_cfg": timm_pretrained_cfg(meta.preprocessing, num_classes)}
            if meta.class_names:
                vitlab_config["label_names"] = list(meta.class_names)
            write_json(tmp / "config.json", vitlab_config)
        (tmp / "README.md").write_text(card)
    return notes


def _yaml_string(text: str) -> str:
    """A YAML scalar that reads back as ``text`` (JSON strings are YAML)."""
    return json.dumps(text)


def _metric_lines(metrics: dict) -> list[str]:
    lines = []
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {shown} |")
    return lines


def model_card(model: nn.Module, repo_id: str, layout: str, *, run: dict | None = None, license: str | None = None,
               source: str | None = None) -> str:
    """The ``README.md`` of a pushed model: YAML front matter (library_name, tags, license, metrics of a run) and a
    short body: architecture, parameter count, input and preprocessing, class names, how to load it, and for a
    training run (``run``: its ``config`` and ``result`` documents) the data, recipe and final test metrics."""
    cfg = model.cfg
    meta = metadata_of(model)
    pre, names = meta.preprocessing, meta.class_names
    library = LAYOUT_LIBRARY[layout]
    classifier = getattr(cfg, "num_classes", 0) > 0
    tags = ["vitlab", "image-classification" if classifier else "image-feature-extraction"]
    tags += ["vision-transformer"] if has_tokens(cfg) else ["resnet"]
    tags += [] if library == "vitlab" else [library]
    front = [f"library_name: {library}", "tags:"] + [f"- {t}" for t in tags]
    front.append(f"pipeline_tag: {tags[1]}")
    if license:
        front.append(f"license: {license}")
    run_config = (run or {}).get("config") or {}
    result = (run or {}).get("result") or {}
    data = run_config.get("data")
    if isinstance(data, str):
        front.append(f"datasets:\n- {_yaml_string(data)}")
    params = sum(p.numel() for p in model.parameters())
    arch = type(cfg).__name__.replace("Config", "")  # a convolutional model: its family (ResNetV2)
    if has_tokens(cfg):
        arch = (f"ViT, width {cfg.embed_dim}, depth {cfg.depth}, {cfg.num_heads} heads, MLP {cfg.mlp_dim}, "
                f"patch {cfg.patch_size[0]}x{cfg.patch_size[1]}, pooling {cfg.pool}")
        options = cfg.family_options()
        if options:
            arch += ", " + ", ".join(f"{k}={v}" for k, v in options.items())
    resize = (f"resize the shorter side to {pre.img_size[0] / pre.crop_pct:.0f} px and centre-crop "
              f"(crop_pct {pre.crop_pct:g})" if pre.resize == "crop" else "resize (squash) to the input size")
    kind = "Vision Transformer" if has_tokens(cfg) else "convolutional"
    body = [f"# {repo_id.split('/')[-1]}", "",
            f"A {kind} model pushed by vitlab in the {layout} layout"
            + (f" ({library})." if library != "vitlab" else "."), "",
            "## Model", "",
            f"- Architecture: {arch}",
            f"- Parameters: {params:,}",
            f"- Input: {pre.channels} x {pre.img_size[0]} x {pre.img_size[1]}",
            f"- Preprocessing: {resize}, {pre.interpolation} interpolation, pixels in [0, 1] normalised with mean "
            f"{list(pre.mean)} and std {list(pre.std)}"]
    if classifier:
        if names:
            shown = ", ".join(str(n) for n in names[:CARD_CLASS_NAMES])
            more = f", ... ({len(names) - CARD_CLASS_NAMES} more)" if len(names) > CARD_CLASS_NAMES else ""
            body.append(f"- Classes: {len(names)}: {shown}{more}")
        else:
            body.append(f"- Classes: {cfg.num_classes} (no names stored)")
    if source:
        body.append(f"- Source checkpoint: {source}")
    if run_config:
        body += ["", "## Training", ""]
        keys = ("data", "model", "model_args", "img_size", "recipe", "optimizer", "lr", "weight_decay",
                "batch_size", "epochs", "steps", "augment", "label_smoothing", "precision", "seed", "init_from")
        shown = [k for k in keys if run_config.get(k) not in (None, "", {}, [])
                 and not (k == "epochs" and run_config.get("steps"))]  # steps, when set, fix the length
        body += [f"- {k}: {run_config[k]}" for k in shown]
        if result.get("steps") is not None:
            body.append(f"- trained for {result['steps']} steps" + (f" on {result['device']}"
                                                                    if result.get("device") else ""))
    metrics = result.get("metrics") if isinstance(result.get("metrics"), dict) else None
    if metrics:
        body += ["", "## Evaluation", "", "Final metrics on the test split (from the run's result.json):", "",
                 "| metric | value |", "|---|---|"] + _metric_lines(metrics)
    body += ["", "## How to load it", "", "```python", "import vitlab", "",
             f'model = vitlab.load("hf-hub:{repo_id}")  # model.preprocessing and model.class_names come with it',
             "```"]
    if layout == "timm":
        body += ["", "```python", "import timm", "", f'model = timm.create_model("hf-hub:{repo_id}", '
                 "pretrained=True)", "config = timm.data.resolve_data_config({}, model=model)",
                 "transform = timm.data.create_transform(**config)", "```"]
    elif layout == "hf":
        body += ["", "```python", "from transformers import AutoImageProcessor, AutoModelForImageClassification", "",
                 f'processor = AutoImageProcessor.from_pretrained("{repo_id}")',
                 f'model = AutoModelForImageClassification.from_pretrained("{repo_id}")', "```"]
    body += ["", f"From the command line: `vitlab predict hf-hub:{repo_id} IMAGE`."]
    return "---\n" + "\n".join(front) + "\n---\n\n" + "\n".join(body) + "\n"
