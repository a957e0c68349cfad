"""The training configuration: one flat dataclass, printable, serialisable and overridable by ``key=value``.

Configs are code (as in big_vision): a recipe (:mod:`vitlab.train.recipes`) is a dict of field values on top of the
defaults, and the command line changes fields with flags or ``--set key=value``. The resolved config is written to
the run folder as ``config.json`` and stored in every checkpoint, so a run can be reproduced and resumed from it.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import typing
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields, replace

from ..errors import InvalidValueError
from ..models.lora import TARGET_WORDS

TRACKER_NAMES = ("tensorboard", "wandb", "mlflow")  # vitlab.train.trackers


class ConfigError(InvalidValueError):
    """A bad training config: an unknown key, a malformed ``--set`` (a ValueError too, as it always was)."""


class OverrideError(ConfigError):
    """A malformed ``key=value`` override (:func:`apply_overrides`): an unknown key, or no ``=``. The message starts
    with what was given; the command line puts ``--set`` before it."""


class ConfigValueError(ConfigError):
    """A training config value out of its range (or of the wrong type). ``field`` and ``value`` say which, ``takes``
    what the field takes; the CLI rewrites the message with the flag the value came from."""

    def __init__(self, field_name: str, value, takes: str):
        self.field, self.value, self.takes = field_name, value, takes
        super().__init__(f"{field_name} = {value!r}: takes {takes}")


def setting(default=MISSING, doc: str = "", *, factory=MISSING, flag: bool | str = False, metavar: str | None = None,
            section: str | None = None):
    """A :class:`TrainConfig` field and its documentation, the one place a setting is described: ``doc`` is its help
    (``vitlab train --help``, :func:`describe`); ``flag`` gives it a flag on ``vitlab train`` / ``finetune`` /
    ``pretrain-mpp`` (True: ``--name-with-dashes``, or the flag's own spelling); ``section`` starts a group of fields
    (and of the command's flags). Its range or choices are its :data:`RULES` entry; every field is also a ``--set``
    key."""
    meta = {"doc": doc, "flag": flag, "metavar": metavar, "section": section}
    return field(default=default, default_factory=factory, metadata=meta)


@dataclass
class TrainConfig:
    """Every setting of a training run. Units: learning rates per optimiser step, steps are optimiser steps, batch
    sizes are global (all processes and accumulation steps together). Each field's ``setting(...)`` documents it."""

    data: str = setting("fashion-mnist", "a named set (fashion-mnist, mnist, cifar10, cifar100, digits), an image "
                        "folder, a .csv / .jsonl manifest, tar shards or a Hugging Face source (hf:org/name, "
                        "save_to_disk folder, parquet)", flag=True, section="data")
    data_dir: str | None = setting(None, "folder holding a named set's files (default: system and cache locations)",
                                   flag=True)
    val_data: str | None = setting(None, "evaluation data (default: the same data, split eval_split)", flag=True)
    train_split: str = setting("train", "the split of data to train on")
    eval_split: str = setting("test", "the split of data to evaluate on")
    download: bool = setting(False, "download a missing named set (torchvision)", flag=True)
    num_classes: int | None = setting(None, "number of classes; needed only for tar shards without classes.txt")
    on_bad_image: str = setting("skip", "an unreadable image: skip (counted and named in the log) or fail", flag=True)
    num_workers: int = setting(2, "DataLoader workers for image folders and shards (in-memory sets use none)",
                               flag="--workers")
    augment: str = setting("inception", "training augmentation: inception (the paper's random-sized crop), crop, "
                           "shift, flip, resize or none", flag=True)
    crop_scale: tuple[float, float] = setting((0.05, 1.0), "area range of the random crop (paper: 5%..100%)")
    flip: bool = setting(True, "random horizontal flips")
    max_shift: int = setting(2, "pixels, for augment=shift")
    randaugment: tuple[int, int] | None = setting(None, "RandAugment (num_ops, magnitude), e.g. (2, 9)")
    mixup: float = setting(0.0, "Beta(alpha, alpha) of mixup; 0 = off")
    cutmix: float = setting(0.0, "Beta(alpha, alpha) of cutmix; 0 = off (both on: one or the other per batch)")
    aug_repeats: int = setting(1, "repeated augmentation (Hoffer et al.; DeiT: 3): each epoch takes 1/N of the "
                               "images and shows each N times in one global batch, augmented differently; the "
                               "epoch keeps its length", flag=True, metavar="N")
    random_erasing: float = setting(0.0, "probability of erasing a random rectangle (0.02-0.33 of the area, aspect "
                                    "0.3-3.3) of a training image with normal noise (Zhong et al.; DeiT: 0.25)",
                                    flag=True, metavar="P")
    label_smoothing: float = setting(0.0, "label smoothing of the softmax loss", flag=True)
    loss: str = setting("auto", "softmax (cross-entropy), sigmoid (per-label sigmoid cross-entropy, head bias -10; "
                        "multi-label) or auto (sigmoid for multi-label data)", flag=True)
    head_bias: float | None = setting(None, "initial bias of a new head; default -10 with the sigmoid loss (the "
                                      "paper's ImageNet-21k), 0 with softmax")
    classes: str | None = setting(None, "class list of a .csv / .jsonl manifest (a text file, one name a line)",
                                  flag=True, metavar="FILE")
    normalize_from_data: bool = setting(False, "per-channel mean / std measured on the training images (saved with "
                                        "the model's preprocessing) instead of the paper's 0.5 / 0.5", flag=True)
    train_subset: int | None = setting(None, "train on this many images: a class-balanced random choice fixed by "
                                       "the seed, nested as the size grows (in-memory sets only)")
    holdout: int = setting(0, "hold out this many training images (class-balanced, disjoint from train_subset) and "
                           "evaluate on them instead (tuning)")
    patch_dropout: float = setting(0.0, "fraction of patch tokens dropped per training image (PatchDropout)")
    full_token_epochs: float = setting(0.0, "with patch_dropout: the last N epochs train on all patch tokens, so "
                                       "training ends on the tokens evaluation sees")
    class_weights: str = setting("none", "weight the label loss by class: none, balanced (N / (K x n_c), every class "
                                 "weighs as much in total; multi-label data: each label's positives weighted "
                                 "negatives / positives) or sqrt (the square root of balanced's weights)",
                                 flag=True, section="imbalanced classes (vitlab.data.balance, docs/training.md)")
    sampling: str = setting("uniform", "how an epoch draws its images: uniform (each once, shuffled), balanced "
                            "(with replacement, every class equally often) or sqrt (class c in proportion to "
                            "sqrt(n_c))", flag=True)
    early_stop: int = setting(0, "end the run when N evaluations in a row have not beaten the best (top-1; the "
                              "loss for MAE pre-training) (0 = off); checkpoints/best.pt keeps the best model "
                              "(vitlab.load reads it)",
                              flag=True, metavar="N")

    model: str = setting("vit_fmnist", "a registered model name (vitlab models)", flag=True, section="model")
    model_args: dict = setting(doc='model config overrides, e.g. {"depth": 4, "dropout": 0.1}', factory=dict)
    img_size: int | None = setting(None, "input resolution (default: the model's own)", flag=True)
    init_from: str | None = setting(None, "checkpoint to start from (fine-tuning); any format vitlab.load reads")
    reset_head: str = setting("auto", "a new zero-initialised head: auto (when the classes differ), always (the "
                              "paper), never")

    linear_probe: bool = setting(False, "train the head only (final norm frozen; dropout and drop-path off)",
                                 flag=True, section="fine-tuning controls (vitlab.train.transfer, docs/training.md)")
    freeze_blocks: int = setting(0, "freeze the embedding and the first N encoder blocks", flag=True, metavar="N")
    freeze: list[str] = setting(doc="freeze parameters by name: globs, module prefixes, index ranges, "
                                "comma-separated or repeated (e.g. patch_embed,pos_embed,blocks.0-5)",
                                factory=list, flag=True, metavar="PATTERNS")
    layer_decay: float | None = setting(None, "layer-wise lr decay (BEiT / MAE): layer l trains at lr x "
                                        "D^(L+1-l), e.g. 0.75", flag=True, metavar="D")

    lora_rank: int = setting(0, "train rank-R LoRA adapters on lora_targets of a frozen model (0 = off; "
                             "fine-tuning only)", flag=True, metavar="R",
                             section="LoRA / DoRA adapters, through peft (vitlab.train.lora, docs/training.md)")
    lora_alpha: float | None = setting(None, "scale the adapters' update by A/R (default A = R)", flag=True,
                                       metavar="A")
    lora_dropout: float = setting(0.0, "dropout on the adapters' input", flag=True, metavar="P")
    lora_targets: list[str] = setting(doc="layers of every block to adapt: qkv, proj, fc1, fc2, attn (qkv,proj), "
                                      "mlp (fc1,fc2)", factory=lambda: ["qkv", "proj"], flag=True, metavar="LAYERS")
    lora_train: list[str] | None = setting(None, "what else trains: head, norm (every LayerNorm), freeze-style "
                                           "patterns, or none; default: the head when it is new", flag=True,
                                           metavar="WHAT")
    dora: bool = setting(False, "DoRA: LoRA with a learned magnitude per output row", flag=True)
    merge_lora: bool = setting(False, "also save the merged model (model.safetensors) beside the adapter", flag=True)
    teacher: str | None = setting(None, "distil from this trained classifier of the same classes (a checkpoint "
                                  "file, run folder, catalog name or hf-hub: repo); frozen, it sees the student's "
                                  "images", flag=True, metavar="MODEL",
                                  section="knowledge distillation (vitlab.train.distill, docs/training.md)")
    distill: str = setting("hard", "hard (cross-entropy with the teacher's top class, DeiT) or soft (KL divergence "
                           "of the temperature softmaxes, Hinton)", flag=True)
    distill_weight: float = setting(0.5, "share of the distillation loss: (1 - W) x label loss + W x distillation "
                                    "loss", flag=True, metavar="W")
    distill_temperature: float = setting(1.0, "softmax temperature of distill=soft (the loss is scaled by T^2)",
                                         flag=True, metavar="T")

    optimizer: str = setting("adamw", "adamw (Adam with decoupled weight decay), sgd (momentum) or muon (Muon for "
                             "the encoder's weight matrices, AdamW for the rest, one lr)", flag=True,
                             section="optimisation")
    lr: float = setting(1e-3, "peak learning rate", flag=True)
    betas: tuple[float, float] = setting((0.9, 0.999), "Adam's betas")
    momentum: float = setting(0.9, "SGD momentum")
    muon_momentum: float = setting(0.95, "Muon's Nesterov momentum (optimizer=muon)")
    weight_decay: float = setting(0.0, "decoupled weight decay, on weight matrices only (not biases, norms, "
                                  "embeddings)", flag=True)
    schedule: str = setting("cosine", "the learning rate after the warmup: cosine, linear or constant")
    warmup_steps: int | None = setting(None, "linear warmup from 0, in steps (default: warmup_epochs)")
    warmup_epochs: float = setting(0.0, "linear warmup from 0, in epochs", flag=True)
    end_lr_factor: float = setting(0.0, "final learning rate = lr x end_lr_factor")
    epochs: float | None = setting(10, "training length in epochs", flag=True)
    steps: int | None = setting(None, "training length in optimiser steps (instead of epochs)", flag=True)
    batch_size: int = setting(256, "global batch per optimiser step", flag=True)
    accum_steps: int = setting(1, "gradient accumulation steps: micro-batch = batch / (processes x accum_steps)",
                               flag=True)
    grad_clip: float = setting(0.0, "global gradient-norm clip; 0 = off")
    ema_decay: float = setting(0.0, "Polyak / EMA averaging factor of the weights; 0 = off", flag=True)
    ema_warmup: bool = setting(True, "EMA decay min(ema_decay, (1 + step) / (10 + step)) early on")

    seed: int = setting(0, "seed of every random choice", flag=True, section="runtime")
    deterministic: bool = setting(False, "deterministic algorithms (torch.use_deterministic_algorithms; "
                                  "bitwise-repeatable on the CPU)", flag=True)
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps", flag=True)
    precision: str = setting("auto", "fp32, bf16 or fp16 (autocast; fp16 with loss scaling, for GPUs without bf16) "
                             "or auto (bf16 where it is native and faster, fp16 on GPUs without bf16)", flag=True)
    compile: bool = setting(False, "torch.compile the model", flag=True)
    grad_checkpointing: bool = setting(False, "recompute each block's activations in the backward pass: far less "
                                       "activation memory for about a third more compute", flag=True)
    threads: int | None = setting(None, "torch threads per process (default: torch's choice)", flag=True)
    fsdp: bool = setting(False, "shard parameters with FSDP2 instead of DDP (with torchrun / --nproc)", flag=True)
    eval_batch_size: int = setting(500, "batch size of the evaluations")
    eval_every_epochs: float = setting(1.0, "evaluate every N epochs; 0 = only at the end")
    save_every_steps: int = setting(0, "also write last.pt every N steps; 0 = off")
    save_every_epochs: float = setting(1.0, "also write last.pt every N epochs; 0 = off")
    save_every_minutes: float = setting(10.0, "... and at least every N minutes of the run; 0 = off")
    log_every_steps: int = setting(50, "log the training loss every N steps")
    max_bad_steps: int = setting(20, "stop after this many consecutive non-finite steps")
    out_dir: str = setting("runs", "where run folders go", flag=True)
    run_name: str | None = setting(None, "run folder name (default: data-model-time)", flag=True)
    progress: bool = setting(True, "progress bar (tqdm, on a terminal)", flag=True)
    trackers: list[str] | None = setting(None, "experiment trackers: tensorboard, wandb, mlflow (comma-separated or "
                                         "repeated) or none; default (null, auto): tensorboard when it is installed "
                                         "(vitlab.train.trackers, docs/training.md)", flag="--tracker",
                                         metavar="NAMES")

    def __post_init__(self) -> None:
        self.freeze = _pattern_list("freeze", self.freeze)
        self.lora_targets = _pattern_list("lora_targets", self.lora_targets)
        if self.trackers is not None:  # "none" (or an empty list) turns every tracker off, "auto" is the default
            names = _pattern_list("trackers", self.trackers)
            self.trackers = None if names == ["auto"] else [n for n in names if n != "none"]
        if self.lora_train is not None:
            self.lora_train = _pattern_list("lora_train", self.lora_train)
        validate(self)

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a typo must not be ignored)."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown training config keys: {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        values = {k: _coerce(k, v, hints[k]) for k, v in data.items()}
        return cls(**values)

    def replace(self, **changes) -> TrainConfig:
        """A copy with fields changed (names checked)."""
        merged = self.to_dict()
        merged.update(changes)
        return TrainConfig.from_dict(merged)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def describe(name: str) -> str:
    """The documentation of :class:`TrainConfig` field ``name`` (its ``setting(doc=...)``)."""
    return _FIELDS[name].metadata.get("doc", "")


def sections() -> list[tuple[str, list]]:
    """The fields of :class:`TrainConfig` in order, grouped by the ``section`` their first field starts:
    ``[(title, [dataclasses.Field, ...]), ...]``."""
    groups: list[tuple[str, list]] = []
    for f in fields(TrainConfig):
        if f.metadata.get("section") or not groups:
            groups.append((f.metadata.get("section") or "", []))
        groups[-1][1].append(f)
    return groups


_FIELDS = {f.name: f for f in fields(TrainConfig)}


def _pattern_list(key: str, value) -> list[str]:
    """A list of strings from a list or a comma-separated string (``--set freeze=patch_embed,blocks.0-5``)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigValueError(key, value, "a list of strings or a comma-separated string")
    return [part.strip() for v in value for part in v.split(",") if part.strip()]


def _coerce(key: str, value, hint):
    """Bring a JSON value back to the field's type (lists to tuples for tuple fields)."""
    if value is None:
        return None
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0]) if len(inner) == 1 else value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigValueError(key, value, f"{len(args)} values")
        try:
            return tuple(a(v) for a, v in zip(args, value))
        except (TypeError, ValueError):
            raise ConfigValueError(key, value, f"{len(args)} values of type {', '.join(a.__name__ for a in args)}"
                              ) from None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ConfigValueError(key, value, _TYPE_WORDS[hint])
    return value


def parse_value(key: str, text: str):
    """Parse the text of ``--set key=value`` for field ``key``: JSON when it parses (numbers, true/false, null,
    lists, dicts), else the raw string. ``model_args.depth=4`` sets one entry of the ``model_args`` dict. A word
    the field takes as a choice stays that word (``augment=none`` is the choice "none", not null), as with its flag."""
    rule = RULES.get(key)
    if rule is not None and text.strip() in rule.choices:
        return text.strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    if isinstance(value, str) and value.lower() in ("none", "null"):
        value = None
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
        value = value.lower() in ("true", "yes", "on")
    if isinstance(value, str) and "," in value and key in _TUPLE_KEYS:
        value = [json.loads(v) if v.strip() else v for v in value.split(",")]
    return value


_TUPLE_KEYS = {f.name for f in fields(TrainConfig) if "tuple" in str(f.type)}


def apply_overrides(config: TrainConfig, assignments: list[str]) -> TrainConfig:
    """Apply ``key=value`` strings (``--set``) to ``config``; unknown keys and bad values raise
    :class:`ConfigError` (:class:`OverrideError` for an unknown key or a string that is not ``key=value``,
    :class:`ConfigValueError` for a value out of range)."""
    data = config.to_dict()
    for item in assignments:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise OverrideError(f"expects key=value, got {item!r}")
        if "." in key:
            top, sub = key.split(".", 1)
            if top != "model_args":
                raise OverrideError(f"{key}: only model_args has sub-keys")
            data["model_args"] = {**data["model_args"], sub: parse_value(sub, text)}
            continue
        if key not in data:
            close = difflib.get_close_matches(key, list(data), n=2)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise OverrideError(f"{key}: unknown training config key{hint}")
        data[key] = parse_value(key, text)
    return TrainConfig.from_dict(data)


def merged(config: TrainConfig, **changes) -> TrainConfig:
    """``dataclasses.replace`` for trusted code paths (no re-validation of types)."""
    return replace(config, **changes)


# ------------------------------------------------------------------------------------------------- validation
_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


@dataclass(frozen=True)
class Rule:
    """What one field takes: ``check(value) -> bool`` and the words for the message."""

    check: Callable[[object], bool]
    takes: str
    choices: tuple[str, ...] = ()  # the words a one-of field takes, read as text by ``--set``


def _is_number(v, integer: bool = False) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return isinstance(v, int) if integer else math.isfinite(v)


def at_least(low, integer: bool = False) -> Rule:
    kind = "an integer" if integer else "a number"
    return Rule(lambda v: _is_number(v, integer) and v >= low, f"{kind} >= {low}")


def above(low) -> Rule:
    return Rule(lambda v: _is_number(v) and v > low, f"a number > {low}")


def fraction(closed: bool = False) -> Rule:
    """[0, 1) (or [0, 1] when ``closed``)."""
    return Rule(lambda v: _is_number(v) and 0 <= v and (v <= 1 if closed else v < 1),
                f"a number in [0, 1{']' if closed else ')'}")


def one_of(*choices: str) -> Rule:
    return Rule(lambda v: v in choices, "one of " + ", ".join(choices), choices)


def pair_of(rule: Rule) -> Rule:
    return Rule(lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(rule.check(x) for x in v),
                f"two values, each {rule.takes}")


def size(low: int = 1, high: int = 16384) -> Rule:
    """An integer size in [low, high], or a (height, width) pair of them."""
    one = Rule(lambda v: _is_number(v, True) and low <= v <= high, f"an integer in [{low}, {high}]")
    both = pair_of(one)
    return Rule(lambda v: one.check(v) or both.check(v), f"{one.takes} (or a pair of them)")


DEVICE = Rule(lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None,
              "auto, cpu, cuda, cuda:N or mps")

# field -> what it takes. Every numeric field has a rule (tests/test_reliability.py checks that a new field gets
# one); None passes for the fields whose type allows it.
RULES: dict[str, Rule] = {
    "num_classes": at_least(1, integer=True),
    "on_bad_image": one_of("skip", "fail"),
    "num_workers": at_least(0, integer=True),
    "augment": one_of("inception", "crop", "shift", "flip", "resize", "none"),
    "crop_scale": Rule(lambda v: pair_of(fraction(closed=True)).check(v) and 0 < v[0] <= v[1],
                       "two numbers 0 < min <= max <= 1"),
    "max_shift": at_least(0, integer=True),
    "randaugment": pair_of(at_least(0, integer=True)),
    "mixup": at_least(0),
    "cutmix": at_least(0),
    "random_erasing": fraction(closed=True),
    "aug_repeats": at_least(1, integer=True),
    "label_smoothing": fraction(),
    "loss": one_of("auto", "softmax", "sigmoid"),
    "head_bias": Rule(lambda v: _is_number(v), "a number"),
    "train_subset": at_least(1, integer=True),
    "holdout": at_least(0, integer=True),
    "patch_dropout": fraction(),
    "full_token_epochs": at_least(0),
    "class_weights": one_of("none", "balanced", "sqrt"),
    "sampling": one_of("uniform", "balanced", "sqrt"),
    "early_stop": at_least(0, integer=True),
    "img_size": size(),
    "reset_head": one_of("auto", "always", "never"),
    "optimizer": one_of("adamw", "sgd", "muon"),
    "lr": above(0),
    "betas": pair_of(fraction()),
    "momentum": fraction(),
    "muon_momentum": fraction(),
    "weight_decay": at_least(0),
    "schedule": one_of("cosine", "linear", "constant"),
    "warmup_steps": at_least(0, integer=True),
    "warmup_epochs": at_least(0),
    "end_lr_factor": fraction(closed=True),
    "epochs": above(0),
    "steps": at_least(1, integer=True),
    "batch_size": at_least(1, integer=True),
    "accum_steps": at_least(1, integer=True),
    "grad_clip": at_least(0),
    "ema_decay": fraction(),
    "seed": Rule(lambda v: _is_number(v, True) and 0 <= v < 2**32, "an integer in [0, 2^32)"),
    "device": DEVICE,
    "precision": one_of("auto", "fp32", "bf16", "fp16"),
    "threads": at_least(1, integer=True),
    "eval_batch_size": at_least(1, integer=True),
    "eval_every_epochs": at_least(0),
    "save_every_steps": at_least(0, integer=True),
    "save_every_epochs": at_least(0),
    "save_every_minutes": at_least(0),
    "log_every_steps": at_least(1, integer=True),
    "trackers": Rule(lambda v: all(t in TRACKER_NAMES for t in v),
                     f"tracker names among {', '.join(TRACKER_NAMES)}, or none / auto", ("none", "auto")),
    "max_bad_steps": at_least(1, integer=True),
    "freeze_blocks": at_least(0, integer=True),
    "layer_decay": Rule(lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1] (e.g. 0.65 or 0.75)"),
    "lora_rank": at_least(0, integer=True),
    "lora_alpha": above(0),
    "lora_dropout": fraction(),
    "distill": one_of("hard", "soft"),
    "distill_weight": fraction(closed=True),
    "distill_temperature": above(0),
    "lora_targets": Rule(lambda v: bool(v) and all(t in TARGET_WORDS for t in v),
                         "layer names among " + ", ".join(TARGET_WORDS)),
}

# model_args entries (architecture overrides) that are checked here; the model's own config checks the rest
MODEL_ARG_RULES: dict[str, Rule] = {
    "img_size": size(),
    "patch_size": size(),
    "in_chans": at_least(1, integer=True),
    "num_classes": at_least(1, integer=True),
    "embed_dim": at_least(1, integer=True),
    "depth": at_least(1, integer=True),
    "num_heads": at_least(1, integer=True),
    "mlp_dim": at_least(1, integer=True),
    "representation_size": at_least(1, integer=True),
    "norm_eps": above(0),
    "dropout": fraction(),
    "attn_dropout": fraction(),
    "drop_path_rate": fraction(),
}


def validate(config: TrainConfig) -> None:
    """Check every field against :data:`RULES` (and ``model_args`` against :data:`MODEL_ARG_RULES`); the first
    value out of range raises :class:`ConfigValueError`."""
    for name, rule in RULES.items():
        value = getattr(config, name)
        if value is None and name in _OPTIONAL:
            continue
        if not rule.check(value):
            raise ConfigValueError(name, value, rule.takes)
    if not isinstance(config.model_args, dict):
        raise ConfigValueError("model_args", config.model_args, "a dict of model config overrides")
    for name, value in config.model_args.items():
        rule = MODEL_ARG_RULES.get(name)
        if rule is not None and not (value is None and name == "representation_size") and not rule.check(value):
            raise ConfigValueError(f"model_args.{name}", value, rule.takes)


_OPTIONAL = {f.name for f in fields(TrainConfig) if "None" in str(f.type)}
