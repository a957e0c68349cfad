"""Reports of every evaluation: machine-readable JSON, a Markdown summary and PNG figures, written atomically.

The writers take the plain dicts that ``evaluate_classifier``, ``fewshot_evaluate`` and ``run_suite`` return, so a
report can be rebuilt from a saved ``results.json`` alone.
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics
from pathlib import Path

import numpy as np

from ..atomic import write_bytes_atomic, write_text_atomic


# ------------------------------------------------------------------------------------------------------------ files
def write_json(path: str | os.PathLike, data) -> Path:
    """Atomically write ``data`` as indented JSON (NaN/inf are rejected: JSON has no such numbers)."""
    return write_bytes_atomic(path, (json.dumps(data, indent=2, allow_nan=False) + "\n").encode())


def write_report(results: dict, out_dir: str | os.PathLike, markdown: str, plots: dict) -> dict[str, Path]:
    """results.json and report.md in ``out_dir``, then each ``{kind: (file name, plot function)}`` of ``plots``;
    returns {kind: path} ("json", "markdown", then the plot kinds)."""
    out = Path(out_dir)
    files = {"json": write_json(out / "results.json", results),
             "markdown": write_text_atomic(out / "report.md", markdown)}
    for kind, (name, plot) in plots.items():
        files[kind] = plot(results, out / name)
    return files


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Render a matplotlib figure to PNG and write it atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return write_bytes_atomic(path, buffer.getvalue())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed; keeps an interactive backend if one is already in use
    import matplotlib.pyplot as plt

    return plt


def _pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ classification
def multilabel_summary(results: dict) -> str:
    """One line for the terminal of a multi-label evaluation: mAP (macro, micro), F1 at the threshold, top-1."""
    parts = [f"{results['samples']} images, {results['num_classes']} labels",
             f"mAP {_pct(results['map_macro'])}% (macro, {results['map_labels']} labels) / "
             f"{_pct(results['map_micro'])}% (micro)",
             f"F1@{results['threshold']:g} {_pct(results['f1_micro'])}% (micro) / {_pct(results['f1_macro'])}% "
             "(macro)"]
    if "top1" in results:
        parts.append(f"top-1 (any label) {_pct(results['top1'])}% of {results['top1_counted']} labelled images")
    parts.append(f"loss {results['loss']:.4f}")
    return ", ".join(parts)


def multilabel_markdown(results: dict, title: str = "Multi-label evaluation") -> str:
    """Markdown: the headline numbers, then each label's positives and average precision."""
    names = results.get("class_names") or [str(i) for i in range(results["num_classes"])]
    rows = [[key, results[key]] for key in ("checkpoint", "data", "split") if key in results]
    rows += [["images", results["samples"]],
             [f"mAP, macro (%), over {results['map_labels']} labels with positives", _pct(results["map_macro"])],
             ["mAP, micro (%)", _pct(results["map_micro"])],
             [f"F1 at {results['threshold']:g}, micro (%)", _pct(results["f1_micro"])],
             [f"F1 at {results['threshold']:g}, macro (%)", _pct(results["f1_macro"])],
             ["precision / recall, micro (%)",
              f"{_pct(results['precision_micro'])} / {_pct(results['recall_micro'])}"]]
    if "top1" in results:
        rows.append([f"top-1 (%), any correct label, {results['top1_counted']} labelled images",
                     _pct(results["top1"])])
    rows.append(["loss (sigmoid cross-entropy, summed over the labels)", f"{results['loss']:.4f}"])
    text = f"# {title}\n\n" + markdown_table(["metric", "value"], rows)
    per_label = [[names[k], results["positives"][k], _pct(ap)] for k, ap in enumerate(results["per_class_ap"])]
    return text + "\n## Per label\n\n" + markdown_table(["label", "positives", "average precision (%)"], per_label)


def classification_markdown(results: dict, title: str = "Classification accuracy") -> str:
    """Markdown: the headline numbers, then per-class accuracy with each class's count and most frequent error."""
    names = results.get("class_names") or [str(i) for i in range(results["num_classes"])]
    header = [k for k in results if k.startswith("top")]
    rows = [["images", results["samples"]]] + [[f"{k} (%)", _pct(results[k])] for k in header]
    if "real" in results:
        real = results["real"]
        rows.append([f"ReaL top1 (%), {real['counted']} images with labels", _pct(real["accuracy"])])
    rows += [["mean per-class accuracy (%)", _pct(results["mean_class_accuracy"])],
             ["macro F1 (%)", _pct(results["macro_f1"])] if "macro_f1" in results else None,
             [f"ECE (%), {results['calibration']['num_bins']} bins", _pct(results["calibration"]["ece"])]]
    rows = [[key, results[key]] for key in ("checkpoint", "data", "split") if key in results] + [r for r in rows if r]
    text = f"# {title}\n\n" + markdown_table(["metric", "value"], rows)
    confusion = results["confusion_matrix"]
    precision = results.get("per_class_precision") or [None] * len(confusion)  # (results of an earlier version)
    f1 = results.get("per_class_f1") or [None] * len(confusion)
    per_class = []
    for i, acc in enumerate(results["per_class_accuracy"]):
        row = confusion[i]
        errors = [(count, j) for j, count in enumerate(row) if j != i and count]
        worst = max(errors) if errors else None
        per_class.append([names[i], sum(row), _pct(acc), _pct(precision[i]), _pct(f1[i]),
                          f"{names[worst[1]]} ({worst[0]})" if worst else "-"])
    text += "\n## Per class\n\n" + markdown_table(
        ["class", "images", "accuracy = recall (%)", "precision (%)", "F1 (%)", "most often taken for"], per_class)
    return text


def plot_confusion(results: dict, path: str | os.PathLike, normalize: bool = True) -> Path:
    """PNG of the confusion matrix (rows = true class, normalised per row by default)."""
    plt = _pyplot()

    matrix = np.asarray(results["confusion_matrix"], dtype=float)
    names = results.get("class_names") or [str(i) for i in range(len(matrix))]
    shown = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1) if normalize else matrix
    k = len(matrix)
    size = min(3 + 0.45 * k, 24)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class" if normalize else "count")
    if k <= 40:
        ax.set_xticks(range(k), names, rotation=90 if k > 10 else 45, ha="center" if k > 10 else "right")
        ax.set_yticks(range(k), names)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if matrix[i, j]:
                    ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if shown[i, j] > 0.5 * (shown.max() or 1) else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix, top-1 {_pct(results.get('top1'))}%")
    return save_figure(fig, path)


def plot_reliability(results: dict, path: str | os.PathLike) -> Path:
    """PNG reliability diagram: accuracy against mean confidence per bin, with the ECE in the title."""
    plt = _pyplot()
    cal = results["calibration"]
    bins = cal["num_bins"]
    edges = [i / bins for i in range(bins)]
    acc = [a if a is not None else 0.0 for a in cal["accuracy"]]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.bar(edges, acc, width=1 / bins, align="edge", edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max softmax)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability, ECE {_pct(cal['ece'])}%")
    ax.legend(loc="upper left")
    return save_figure(fig, path)


def write_classification_report(results: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """results.json, report.md, confusion.png and reliability.png in ``out_dir`` (multi-label results: results.json
    and report.md); returns {kind: path}."""
    if results.get("multi_label"):
        return write_report(results, out_dir, multilabel_markdown(results), {})
    return write_report(results, out_dir, classification_markdown(results),
                        {"confusion": ("confusion.png", plot_confusion),
                         "reliability": ("reliability.png", plot_reliability)})


# --------------------------------------------------------------------------------------------------------- few-shot
METHOD_NAMES = {"lsr": "linear least squares (closed form)", "knn": "kNN (cosine)", "linear": "logistic probe"}


def _fewshot_metric(results: dict) -> str:
    """What few-shot results measure: accuracy, or (multi-label data) macro mean average precision."""
    return "mAP (macro)" if results.get("multi_label") else "accuracy"


def fewshot_summary(results: dict) -> str:
    """One line per method: accuracy (multi-label: macro mAP, and micro) by shots, mean +- std over seeds."""
    lines = []
    for method, data in results["methods"].items():
        cells = [f"{n}-shot {_pct(r['mean'])}±{_pct(r['std'])}"
                 + (f" (micro {_pct(statistics.fmean(r['map_micro']))})" if "map_micro" in r else "")
                 for n, r in data["results"].items()]
        what = "mAP, % over" if results.get("multi_label") else "% over"
        lines.append(f"{method}: " + ", ".join(cells) + f" ({what} {len(results['seeds'])} seeds)")
    return "\n".join(lines)


def fewshot_markdown(results: dict, title: str = "Few-shot linear evaluation") -> str:
    """Markdown: accuracy by method and shots (mean ± std over seeds, min-max), and the chosen hyper-parameters."""
    shots = [str(s) for s in results["shots"]]
    text = f"# {title}\n\n"
    details = [f"{results['num_classes']} classes", f"{results['feature_dim']}-d features",
               f"seeds {', '.join(map(str, results['seeds']))}",
               f"{results['holdout_per_class']} held-out images per class pick the hyper-parameter",
               f"{results['num_test']} test images"]
    details = [f"{key}: {results[key]}" for key in ("checkpoint", "data", "representation") if key in results] + details
    metric = _fewshot_metric(results)
    if results.get("multi_label"):
        details[0] = f"{results['num_classes']} labels (multi-label; shots and held-out images per label)"
    text += "; ".join(details) + f".\n\nTest {metric} (%), mean ± standard deviation over seeds:\n\n"
    rows = []
    for method, data in results["methods"].items():
        rows.append([METHOD_NAMES.get(method, method)]
                    + [f"{_pct(data['results'][n]['mean'])} ± {_pct(data['results'][n]['std'])}" for n in shots])
    text += markdown_table(["method"] + [f"{n}-shot" for n in shots], rows)
    text += "\nRange over seeds (min - max) and the hyper-parameter each seed chose:\n\n"
    rows = []
    for method, data in results["methods"].items():
        for n in shots:
            r = data["results"][n]
            chosen = ", ".join(f"{c:g}" for c in r["chosen"])
            rows.append([method, n, f"{_pct(r['min'])} - {_pct(r['max'])}", f"{data['param_name']} = {chosen}"])
    text += markdown_table(["method", "shots", f"{metric} range (%)", "chosen"], rows)
    if results.get("multi_label"):
        rows = [[method, n, f"{_pct(statistics.fmean(data['results'][n]['map_micro']))}"]
                for method, data in results["methods"].items() for n in shots]
        text += "\nMicro mAP (all image-label pairs pooled; %), mean over seeds:\n\n"
        text += markdown_table(["method", "shots", "mAP (micro)"], rows)
    return text


def plot_fewshot(results: dict, path: str | os.PathLike) -> Path:
    """PNG of accuracy against shots (log axis), one line per method, error bars = std over seeds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    shots = results["shots"]
    for method, data in results["methods"].items():
        mean = [100 * data["results"][str(n)]["mean"] for n in shots]
        std = [100 * data["results"][str(n)]["std"] for n in shots]
        ax.errorbar(shots, mean, yerr=std, marker="o", capsize=3, label=METHOD_NAMES.get(method, method))
    if len(shots) > 1 and shots[0] > 0:
        ax.set_xscale("log")
    ax.set_xticks(shots, [str(s) for s in shots])
    ax.minorticks_off()
    ax.set_xlabel("training images per class (shots)")
    ax.set_ylabel(f"test {_fewshot_metric(results)} (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"Few-shot {_fewshot_metric(results)}, {len(results['seeds'])} seeds")
    return save_figure(fig, path)


def write_fewshot_report(results: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """results.json, report.md and fewshot.png in ``out_dir``; returns {kind: path}."""
    return write_report(results, out_dir, fewshot_markdown(results), {"plot": ("fewshot.png", plot_fewshot)})


# ------------------------------------------------------------------------------------------------------------ suite
def suite_summary(results: dict) -> str:
    """One line per task and group, then the mean."""
    lines = [f"{t['name']}: {_pct(t['accuracy'])}%" for t in results["tasks"] if t.get("accuracy") is not None]
    lines += [f"[{g}] mean {_pct(v)}%" for g, v in results.get("groups", {}).items()]
    if results.get("mean") is not None:
        lines.append(f"mean over {len(results['tasks'])} tasks: {_pct(results['mean'])}%")
    return "\n".join(lines)


def suite_markdown(results: dict, title: str | None = None) -> str:
    """Markdown: one row per task (group, mode, chosen hyper-parameter, accuracy, time), group means, overall mean."""
    title = title or f"Suite {results.get('name', '')}".strip()
    text = f"# {title}\n\n"
    if "checkpoint" in results:
        text += f"checkpoint: {results['checkpoint']}\n\n"
    rows = []
    for t in results["tasks"]:
        chosen = t.get("chosen")
        chosen_text = "-" if chosen is None else f"{t.get('param_name', '')} = {chosen:g}"
        rows.append([t["name"], t.get("group") or "-", t["mode"], t.get("num_train", "-"), t.get("num_test", "-"),
                     chosen_text, _pct(t.get("accuracy")), f"{t.get('seconds', math.nan):.0f}"])
    text += markdown_table(["task", "group", "mode", "train", "test", "chosen", "accuracy (%)", "time (s)"], rows)
    if results.get("groups"):
        text += "\n" + markdown_table(["group", "mean accuracy (%)"],
                                      [[g, _pct(v)] for g, v in results["groups"].items()])
    if results.get("mean") is not None:
        text += f"\nMean over {len(results['tasks'])} tasks: **{_pct(results['mean'])}%**"
        if results.get("groups"):
            text += f"; mean of the group means: **{_pct(results['mean_of_groups'])}%**"
        text += "\n"
    return text


def plot_suite(results: dict, path: str | os.PathLike) -> Path:
    """PNG bar chart of per-task accuracy, coloured by group."""
    plt = _pyplot()
    tasks = [t for t in results["tasks"] if t.get("accuracy") is not None]
    groups = sorted({t.get("group") or "" for t in tasks})
    colours = {g: f"C{i}" for i, g in enumerate(groups)}
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(tasks) + 2), 4))
    ax.bar(range(len(tasks)), [100 * t["accuracy"] for t in tasks],
           color=[colours[t.get("group") or ""] for t in tasks])
    ax.set_xticks(range(len(tasks)), [t["name"] for t in tasks], rotation=45, ha="right")
    ax.set_ylabel(f"test {_fewshot_metric(results)} (%)")
    ax.set_ylim(0, 100)
    if len(groups) > 1 or groups != [""]:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=colours[g], label=g or "ungrouped") for g in groups], loc="lower right")
    ax.set_title(f"{results.get('name', 'suite')}: mean {_pct(results.get('mean'))}%")
    return save_figure(fig, path)


def write_suite_report(results: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """results.json, report.md and suite.png in ``out_dir``; returns {kind: path}."""
    return write_report(results, out_dir, suite_markdown(results), {"plot": ("suite.png", plot_suite)})


# -------------------------------------------------------------------------------------------------------- retrieval
RETRIEVAL_DIRECTIONS = (("image_to_text", "image -> text"), ("text_to_image", "text -> image"))


def retrieval_summary(results: dict) -> str:
    """One line: recall@K of both directions (:func:`vitlab.evaluate.retrieval.retrieval_metrics`) and the counts."""
    parts = []
    for key, name in RETRIEVAL_DIRECTIONS:
        recalls = [(k.split("@")[1], v) for k, v in results[key].items() if k.startswith("recall@")]
        parts.append(f"{name} " + ", ".join(f"R@{k} {_pct(v)}%" for k, v in recalls))
    return "; ".join(parts) + f" ({results['images']:,} images, {results['texts']:,} captions)"


def retrieval_markdown(results: dict, title: str = "Image-text retrieval") -> str:
    """Markdown: one row per direction (recall@K in %, mean and median rank)."""
    text = f"# {title}\n\n"
    for key in ("checkpoint", "data", "split"):
        if key in results:
            text += f"{key}: {results[key]}\n\n"
    ks = [k for k in results["image_to_text"] if k.startswith("recall@")]
    rows = [[name, *(_pct(results[key][k]) for k in ks), f"{results[key]['mean_rank']:.1f}",
             f"{results[key]['median_rank']:g}"] for key, name in RETRIEVAL_DIRECTIONS]
    text += markdown_table(["direction", *(f"R@{k.split('@')[1]} (%)" for k in ks), "mean rank", "median rank"],
                           rows)
    text += (f"\n{results['images']:,} images, {results['texts']:,} captions"
             + (f"; {results['skipped']:,} unreadable images left out with their captions" if results.get("skipped")
                else "") + ".\n")
    return text


def write_retrieval_report(results: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """results.json and report.md in ``out_dir``; returns {kind: path}."""
    return write_report(results, out_dir, retrieval_markdown(results), {})
