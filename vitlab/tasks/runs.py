"""The evaluation commands as functions: checkpoint and data in, results (plain data) and report files out.

The CLI modules only parse arguments, call these, and print; Python users can call them the same way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ..compute.onednn import linear_shapes
from ..compute.precision import choose_cpu_precision
from ..compute.pt2 import is_exported_file, load_exported
from ..compute.tome import merge_tokens as merge_model_tokens
from ..compute.tome import token_counts
from ..data import SPLIT_FOLDERS
from ..data.captions import build_captioned
from ..data.manifest import looks_like_manifest
from ..devices import resolve_device
from ..errors import VitlabError
from ..evaluate.classification import evaluate_classifier, load_label_sets
from ..evaluate.classmap import SelectLogits, check_classes, match_classes_by_name, restrict_to_matched
from ..evaluate.data import class_names_of, eval_dataset, limit_dataset
from ..evaluate.distributed import world
from ..evaluate.fewshot import DEFAULT_SEEDS, DEFAULT_SHOTS, fewshot_model
from ..evaluate.report import write_classification_report, write_fewshot_report, write_retrieval_report
from ..evaluate.retrieval import BLOCK_ELEMENTS, DEFAULT_KS, evaluate_retrieval
from ..factory import load
from ..image_text import load_image_text
from ..models import metadata_of
from ..preprocessing import Preprocessing
from ..zeroshot import zero_shot_classifier
from .suite import run_suite
from .suite_config import load_suite_config


def load_for_eval(checkpoint: str | os.PathLike, model_name: str | None = None,
                  device: torch.device | str = "cpu", img_size: int | None = None,
                  merge_r: int | Sequence[int] = 0):
    """``vitlab.load`` a checkpoint for evaluation, on ``device``, in eval mode, with its preprocessing (at
    ``img_size`` when given: the position embeddings are resampled and the preprocessing follows). An ``.onnx``
    file (``vitlab export-onnx``, float32 or int8) runs on ONNX Runtime, a ``.pt2`` package (``vitlab export``) on
    AOTInductor, each with the preprocessing stored in it. ``merge_r`` > 0 switches token merging on
    (:func:`vitlab.compute.merge_tokens`, ``r`` tokens merged away per block)."""
    if is_exported_file(checkpoint):
        if img_size is not None:
            raise VitlabError(f"{checkpoint}: an exported file runs at its exported resolution; drop img_size",
                              options=("img_size",))
        if merge_r:
            raise VitlabError(f"{checkpoint}: an exported file runs as it was exported, without token merging; "
                              "drop merge_tokens", options=("merge_tokens",))
        return load_exported(checkpoint)
    model = load(checkpoint, model_name=model_name, img_size=img_size).to(device).eval()
    model.preprocessing = metadata_of(model).preprocessing
    return merge_model_tokens(model, merge_r) if merge_r else model


def fewshot_checkpoint(
    checkpoint: str | os.PathLike,
    data: str,
    out_dir: str | os.PathLike | None = None,
    train_split: str = "train",
    test_split: str = "test",
    data_dir: str | None = None,
    representation: str = "pre_logits",
    methods: Sequence[str] = ("lsr", "knn", "linear"),
    shots: Sequence[int] = DEFAULT_SHOTS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    holdout_per_class: int = 10,
    max_test: int | None = None,
    grids: dict | None = None,
    model_name: str | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str = "auto",
    progress: bool = False,
) -> dict:
    """``vitlab fewshot``: the paper's few-shot linear evaluation of a checkpoint on a data set.

    The images are prepared with the checkpoint's preprocessing. ``max_test`` scores a seeded random subset of the
    test split. With ``out_dir`` the report (results.json, report.md, fewshot.png) is written there. Returns the
    result of :func:`fewshot.fewshot_model` plus ``checkpoint``, ``data`` and ``files``."""
    dev = resolve_device(device)
    model = load_for_eval(checkpoint, model_name, dev)
    train = eval_dataset(data, train_split, model.preprocessing, data_dir=data_dir, on_error="fail")
    test = limit_dataset(eval_dataset(data, test_split, model.preprocessing, data_dir=data_dir, on_error="fail"),
                         max_test)
    names = class_names_of(train)
    results = fewshot_model(model, train, test, representation=representation, shots=shots, seeds=seeds,
                            holdout_per_class=holdout_per_class, batch_size=batch_size,
                            num_classes=len(names) if names else None, methods=methods, grids=grids,
                            device=dev, num_workers=num_workers, progress=progress)
    results = {"checkpoint": str(checkpoint), "data": f"{data} ({train_split} / {test_split})", **results}
    if out_dir is not None and world()[0] == 0:
        results["files"] = {k: str(v) for k, v in write_fewshot_report(results, out_dir).items()}
    return results


def eval_checkpoint(
    checkpoint: str | os.PathLike,
    data: str,
    split: str = "test",
    out_dir: str | os.PathLike | None = None,
    labels_file: str | os.PathLike | None = None,
    data_dir: str | None = None,
    preprocessing: Preprocessing | None = None,
    img_size: int | None = None,
    model_name: str | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str = "auto",
    precision: str = "fp32",
    on_bad_image: str = "skip",
    max_samples: int | None = None,
    num_bins: int = 15,
    progress: bool = False,
    on_skipped=None,
    map_classes_by_name: bool = False,
    threshold: float = 0.5,
    merge_tokens: int | Sequence[int] = 0,
    zero_shot_templates: Sequence[str] | None = None,
) -> dict:
    """``vitlab eval``: top-1 / top-5, loss, per-class accuracy, confusion matrix and calibration (ECE) of a
    checkpoint on a data split, plus ReaL-style multi-label accuracy with ``labels_file``. Multi-label data (a
    manifest with a ``labels`` column) get mean average precision (macro, micro), F1 at ``threshold`` and ReaL-style
    top-1 instead (:func:`vitlab.evaluate.metrics.multilabel_metrics`); a manifest's rows are read with the
    checkpoint's class list when it has one.

    Data whose classes are not the checkpoint's (another count, or other names than those the checkpoint carries)
    are refused; ``map_classes_by_name`` instead evaluates on the classes both name, with the logits of those
    classes in the data's order (``results["class_mapping"]`` says how many matched; see
    :mod:`vitlab.evaluate.classmap`).

    The images are prepared with the checkpoint's preprocessing unless ``preprocessing`` is given; ``img_size``
    evaluates at another resolution (position embeddings resampled, preprocessing resized). Under ``torchrun`` every
    process evaluates a disjoint share and all get the exact whole-set result; only rank 0 writes the report into
    ``out_dir`` (results.json, report.md, confusion.png, reliability.png). ``merge_tokens`` evaluates with token
    merging (:func:`vitlab.compute.merge_tokens`, that many tokens merged away per block; the results then hold
    ``token_merging``: ``r`` per block and the ``tokens`` entering each block). Returns the metrics dict of
    :func:`classification.evaluate_classifier` plus ``checkpoint``, ``data``, ``split`` and ``files``.

    With ``zero_shot_templates`` the checkpoint is an image-text model (:func:`vitlab.load_image_text`) evaluated as
    the zero-shot classifier of the data's class names in those prompt templates (:mod:`vitlab.zeroshot`); the
    results then hold ``zero_shot`` (the templates)."""
    dev = resolve_device(device)
    if zero_shot_templates is not None:
        model, dataset = zero_shot_for_data(checkpoint, zero_shot_templates, data, split, dev, preprocessing,
                                            data_dir=data_dir, on_error=on_bad_image, img_size=img_size,
                                            model_name=model_name, merge_r=merge_tokens)
    else:
        model = load_for_eval(checkpoint, model_name, dev, img_size=img_size, merge_r=merge_tokens)
    merging = {"r": list(model.merge_r), "tokens": token_counts(model)} if merge_tokens else None
    if dev.type == "cpu" and precision != "fp32":  # bf16 on a CPU that emulates it: runs as asked, warns once
        precision = choose_cpu_precision(precision, linear_shapes(model, min_features=0))
    pre = preprocessing or model.preprocessing
    own_classes = None if map_classes_by_name else metadata_of(model).class_names
    if zero_shot_templates is None:
        dataset = eval_dataset(data, split, pre, data_dir=data_dir, on_error=on_bad_image,
                               classes=own_classes if looks_like_manifest(data) else None)
    if getattr(dataset, "multi_label", False) and (map_classes_by_name or labels_file is not None):
        raise VitlabError(f"{data}: multi-label data are scored on their own labels; drop map_classes_by_name "
                          "and labels_file", options=("map_classes_by_name", "labels_file"))
    model, dataset, mapping = match_model_to_data(model, dataset, str(checkpoint), data, map_classes_by_name,
                                                  labels_file is not None)
    dataset = limit_dataset(dataset, max_samples)
    label_sets = None
    if labels_file is not None:
        if max_samples is not None:
            raise VitlabError("a labels file covers the whole split; drop the sample limit")
        samples = getattr(dataset, "samples", None)
        label_sets = load_label_sets(labels_file, [s[0] for s in samples] if samples is not None else None)
    class_names = mapping.names if mapping else metadata_of(model).class_names or class_names_of(dataset)
    if class_names is not None and not mapping and len(class_names) != model.cfg.num_classes:
        class_names = None
    results = evaluate_classifier(model, dataset, batch_size=batch_size, label_sets=label_sets, num_bins=num_bins,
                                  class_names=class_names, device=dev, num_workers=num_workers, progress=progress,
                                  precision=precision, on_skipped=on_skipped, threshold=threshold)
    results = {"checkpoint": str(checkpoint), "data": data, "split": split, "preprocessing": pre.to_dict(),
               **results}
    if merging:
        results["token_merging"] = merging
    if zero_shot_templates is not None:
        results["zero_shot"] = {"templates": list(zero_shot_templates)}
    if mapping:
        results["class_mapping"] = mapping.summary()
    if out_dir is not None and world()[0] == 0:
        results["files"] = {k: str(v) for k, v in write_classification_report(results, out_dir).items()}
    return results


def retrieval_checkpoint(
    checkpoint: str | os.PathLike,
    data: str,
    split: str = "test",
    out_dir: str | os.PathLike | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    text_column: str | None = None,
    preprocessing: Preprocessing | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str = "auto",
    precision: str = "fp32",
    on_bad_image: str = "skip",
    block_elements: int = BLOCK_ELEMENTS,
    progress: bool = False,
) -> dict:
    """``vitlab eval --retrieval``: image -> text and text -> image recall@K (and mean / median rank) of an
    image-text model (anything :func:`vitlab.load_image_text` reads) on captioned images: a manifest with a text
    column or a Hugging Face source with one (:mod:`vitlab.data.captions`; ``split`` picks the manifest's rows or the
    source's split). The images are prepared with the image tower's preprocessing unless ``preprocessing`` is given.
    Returns :func:`vitlab.evaluate.retrieval.evaluate_retrieval`'s results plus ``checkpoint``, ``data``, ``split``,
    ``preprocessing`` and, with ``out_dir``, ``files`` (results.json, report.md written there)."""
    if is_exported_file(checkpoint):
        raise VitlabError(f"{checkpoint}: an exported file holds no text tower; retrieval needs the image-text model")
    dev = resolve_device(device)
    model = load_image_text(checkpoint).to(dev).eval()
    pre = preprocessing or metadata_of(model.visual).preprocessing
    dataset = build_captioned(data, SPLIT_FOLDERS.get(split, (split,)), text_column=text_column,
                              channels=pre.channels, on_error=on_bad_image)
    dataset.transform = pre.transform()
    if dev.type == "cpu" and precision != "fp32":  # bf16 on a CPU that emulates it: runs as asked, warns once
        precision = choose_cpu_precision(precision, linear_shapes(model.visual, min_features=0))
    results = evaluate_retrieval(model, dataset, ks, batch_size=batch_size, num_workers=num_workers,
                                 precision=precision, block_elements=block_elements, progress=progress)
    results = {"checkpoint": str(checkpoint), "data": data, "split": split, "preprocessing": pre.to_dict(),
               **results}
    if out_dir is not None:
        results["files"] = {k: str(v) for k, v in write_retrieval_report(results, out_dir).items()}
    return results


def zero_shot_for_data(checkpoint: str | os.PathLike, templates: Sequence[str], data: str, split: str,
                       device: torch.device, preprocessing: Preprocessing | None = None, *, data_dir: str | None = None,
                       on_error: str = "skip", img_size: int | None = None, model_name: str | None = None,
                       merge_r: int | Sequence[int] = 0):
    """(classifier, dataset): the data split read with the image-text model's image preprocessing (or
    ``preprocessing``) and the zero-shot classifier of its class names, on ``device`` in eval mode."""
    if img_size is not None or model_name is not None:
        raise VitlabError(f"{checkpoint}: a zero-shot classifier runs at its image tower's own size and architecture; "
                          "drop img_size and model_name", options=("img_size", "model_name"))
    if is_exported_file(checkpoint):
        raise VitlabError(f"{checkpoint}: an exported file holds no text tower; zero-shot classification needs the "
                          "image-text model", options=("zero_shot_templates",))
    image_text = load_image_text(checkpoint).to(device).eval()
    pre = preprocessing or metadata_of(image_text.visual).preprocessing
    dataset = eval_dataset(data, split, pre, data_dir=data_dir, on_error=on_error)
    names = class_names_of(dataset)
    if getattr(dataset, "multi_label", False) or not names:
        raise VitlabError(f"{data}: zero-shot evaluation needs single-label data that name their classes (folders, "
                          "a named set, a manifest with class names)")
    model = zero_shot_classifier(image_text, names, templates).to(device).eval()
    model = merge_model_tokens(model, merge_r) if merge_r else model
    return model, dataset


def match_model_to_data(model, dataset, checkpoint: str, data: str, by_name: bool = False,
                        multi_label: bool = False):
    """(model, dataset, match): unchanged after :func:`classmap.check_classes` passes, or with ``by_name`` the model's
    logits and the data restricted to the classes both name (``match`` a :class:`classmap.ClassMatch`, else None)."""
    model_names = metadata_of(model).class_names
    data_names = class_names_of(dataset)
    if not by_name:
        check_classes(model.cfg.num_classes, model_names, data_names, checkpoint, data)
        return model, dataset, None
    if multi_label:
        raise VitlabError("a multi-label labels file numbers the data's own classes; it cannot be combined with "
                          "matching classes by name")
    match = match_classes_by_name(model_names, data_names, checkpoint, data)
    dataset, left_out = restrict_to_matched(dataset, match)
    match.images_left_out = left_out
    return SelectLogits(model, match.model_indices), dataset, match


def suite_checkpoint(
    config_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    model_name: str | None = None,
    device: str = "auto",
    progress: bool = False,
    log=print,
) -> dict:
    """``vitlab suite``: run (or resume) the suite in ``config_path`` on a checkpoint (the config's ``checkpoint``
    unless one is given) and write results.json, report.md and suite.png into ``out_dir``. A suite with
    ``zero-shot`` tasks needs an image-text checkpoint (:func:`vitlab.load_image_text` reads it as well)."""
    config = load_suite_config(config_path)
    checkpoint = checkpoint if checkpoint is not None else config.checkpoint
    if checkpoint is None:
        raise VitlabError(f"{config_path}: no checkpoint; give one on the command line or as 'checkpoint' in the "
                          "config")
    dev = resolve_device(device)
    model = load_for_eval(checkpoint, model_name, dev)
    image_text = None
    if any(task.mode == "zero-shot" for task in config.tasks):  # the text tower too: the checkpoint's CLIP / SigLIP
        image_text = load_image_text(checkpoint).to(dev).eval()
    return run_suite(config, model, out_dir, checkpoint=checkpoint, device=dev, progress=progress, log=log,
                     image_text=image_text)
