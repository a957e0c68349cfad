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
from dataclasses import asdict, dataclass, field, fields, replace

from ..errors import InvalidValueError
from ..models.lora import TARGET_WORDS

TRACKER_NAMES = ("tensorboard", "wandb", "mlflow")  # vitlab.train.trackers


class ConfigError(InvalidValueError):
    """A bad training config: an unknown key, a malformed ``--set`` (a ValueError too, as it always was)."""


class ConfigValueError(ConfigError):
    """A training config value out of its range (or of the wrong type). ``field`` and ``value`` say which, ``takes``
    what the field takes; the CLI rewrites the message with the flag the value came from."""

    def __init__(self, field_name: str, value, takes: str):
        self.field, self.value, self.takes = field_name, value, takes
        super().__init__(f"{field_name} = {value!r}: takes {takes}")


@dataclass
class TrainConfig:
    """Every setting of a training run. Units: learning rates per optimiser step, steps are optimiser steps, batch
    sizes are global (all processes and accumulation steps together)."""

    # ----- data
    data: str = "fashion-mnist"             # a named set, an image folder, tar shards or a Hugging Face source
                                            # (hf:org/name, save_to_disk folder, parquet; see vitlab.data)
    data_dir: str | None = None             # where named sets' files are (default: system and cache locations)
    val_data: str | None = None             # evaluation source (default: the same data, split eval_split)
    train_split: str = "train"
    eval_split: str = "test"
    download: bool = False                  # let torchvision download named sets when missing
    num_classes: int | None = None          # needed only for tar shards without classes.txt
    on_bad_image: str = "skip"              # skip (count and name in the log) or fail
    num_workers: int = 2                    # DataLoader workers for folders and shards (in-memory sets use none)
    augment: str = "inception"              # inception (paper), crop, shift, flip, resize, none
    crop_scale: tuple[float, float] = (0.05, 1.0)  # area range of the random crop (paper: 5%..100%)
    flip: bool = True
    max_shift: int = 2                      # pixels, for augment=shift
    randaugment: tuple[int, int] | None = None  # (num_ops, magnitude), e.g. (2, 9)
    mixup: float = 0.0                      # Beta(alpha, alpha) of mixup; 0 = off
    cutmix: float = 0.0                     # Beta(alpha, alpha) of cutmix; 0 = off (both on: one or the other)
    label_smoothing: float = 0.0
    loss: str = "auto"                      # softmax (cross-entropy), sigmoid (per-label sigmoid cross-entropy,
                                            # head bias -10) or auto (sigmoid for multi-label data)
    head_bias: float | None = None          # initial bias of a new head; default -10 with the sigmoid loss (the
                                            # paper's ImageNet-21k), 0 with softmax
    classes: str | None = None              # class list of a CSV / JSONL manifest (a text file, one name a line)
    normalize_from_data: bool = False       # per-channel mean / std measured on the training images (saved with
                                            # the model's preprocessing) instead of the paper's 0.5 / 0.5
    train_subset: int | None = None         # train on this many images: a class-balanced random choice fixed
                                            # by the seed, nested as the size grows (in-memory sets only)
    holdout: int = 0                        # hold out this many training images (class-balanced, disjoint
                                            # from train_subset) and evaluate on them instead (tuning)
    patch_dropout: float = 0.0              # fraction of patch tokens dropped per training image (PatchDropout)

    # ----- model
    model: str = "vit_fmnist"               # a registered name (vitlab models)
    model_args: dict = field(default_factory=dict)  # ViTConfig overrides, e.g. {"depth": 4, "dropout": 0.1}
    img_size: int | None = None             # input resolution (default: the model's own)
    init_from: str | None = None            # checkpoint to start from (fine-tuning); any format vitlab.load reads
    reset_head: str = "auto"                # auto (new zero head when the classes differ), always, never

    # ----- fine-tuning controls (vitlab.train.transfer)
    linear_probe: bool = False              # train the head only (final norm frozen; dropout, drop-path off)
    freeze_blocks: int = 0                  # freeze the embedding and the first N encoder blocks
    freeze: list[str] = field(default_factory=list)  # parameter-name patterns to freeze: globs, module prefixes,
                                            # index ranges (patch_embed, pos_embed, blocks.0-5, blocks.*.attn)
    layer_decay: float | None = None        # layer-wise lr decay (BEiT / MAE): layer l at lr x decay^(L+1-l)

    # ----- low-rank adapters (vitlab.train.lora, through peft; fine-tuning only)
    lora_rank: int = 0                      # LoRA rank r (0 = off): adapters on lora_targets, the rest frozen
    lora_alpha: float | None = None         # the adapters' update is scaled by alpha / r (default: alpha = r)
    lora_dropout: float = 0.0               # dropout on the adapters' input
    lora_targets: list[str] = field(default_factory=lambda: ["qkv", "proj"])  # qkv, proj, fc1, fc2 of every
                                            # block; attn = qkv,proj, mlp = fc1,fc2
    lora_train: list[str] | None = None     # what else trains: head, norm (every LayerNorm) or freeze-style
                                            # patterns; none = adapters only; default: the head when it is new
    dora: bool = False                      # DoRA: LoRA with a learned magnitude per output row
    merge_lora: bool = False                # also save the merged model (model.safetensors) beside the adapter

    # ----- optimisation
    optimizer: str = "adamw"                # adamw (Adam with decoupled weight decay) or sgd (momentum)
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9                   # sgd only
    weight_decay: float = 0.0               # decoupled, on weight matrices only (not biases, norms, embeddings)
    schedule: str = "cosine"                # cosine, linear or constant after the warmup
    warmup_steps: int | None = None         # linear warmup from 0; default: warmup_epochs
    warmup_epochs: float = 0.0
    end_lr_factor: float = 0.0              # final learning rate = lr x end_lr_factor
    epochs: float | None = 10               # training length in epochs ...
    steps: int | None = None                # ... or in optimiser steps (takes precedence)
    batch_size: int = 256                   # global batch per optimiser step
    accum_steps: int = 1                    # gradient accumulation: micro-batch = batch / (processes x accum)
    grad_clip: float = 0.0                  # global gradient-norm clip; 0 = off
    ema_decay: float = 0.0                  # Polyak / EMA averaging of the weights; 0 = off
    ema_warmup: bool = True                 # decay min(ema_decay, (1 + step) / (10 + step)) early on

    # ----- runtime
    seed: int = 0
    deterministic: bool = False             # torch.use_deterministic_algorithms (bitwise-repeatable on CPU)
    device: str = "auto"                    # auto, cpu, cuda, cuda:1, ...
    precision: str = "auto"                 # fp32, bf16 (autocast) or auto (bf16 on GPUs that have it)
    compile: bool = False                   # torch.compile the model
    threads: int | None = None              # torch intra-op threads (default: torch's choice)
    fsdp: bool = False                      # shard parameters with FSDP2 instead of DDP (multi-process runs)
    eval_batch_size: int = 500
    eval_every_epochs: float = 1.0          # 0 = evaluate only at the end
    save_every_steps: int = 0               # also write last.pt every N steps (0 = off)
    save_every_epochs: float = 1.0          # also write last.pt every N epochs (0 = off)
    save_every_minutes: float = 10.0        # ... and at least every N minutes of the run (0 = off)
    log_every_steps: int = 50
    max_bad_steps: int = 20                 # stop after this many consecutive non-finite steps
    out_dir: str = "runs"
    run_name: str | None = None             # default: <data>-<model>-<timestamp>
    progress: bool = True                   # tqdm progress bar (on a terminal)
    trackers: list[str] | None = None       # tensorboard, wandb, mlflow; None: TensorBoard when installed; [] none

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
    :class:`ConfigError` (:class:`ConfigValueError` for a value out of range)."""
    data = config.to_dict()
    for item in assignments:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        if "." in key:
            top, sub = key.split(".", 1)
            if top != "model_args":
                raise ConfigError(f"--set {key}: only model_args has sub-keys")
            data["model_args"] = {**data["model_args"], sub: parse_value(sub, text)}
            continue
        if key not in data:
            close = difflib.get_close_matches(key, list(data), n=2)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise ConfigError(f"--set {key}: unknown training config key{hint}")
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
    "label_smoothing": fraction(),
    "loss": one_of("auto", "softmax", "sigmoid"),
    "head_bias": Rule(lambda v: _is_number(v), "a number"),
    "train_subset": at_least(1, integer=True),
    "holdout": at_least(0, integer=True),
    "patch_dropout": fraction(),
    "img_size": size(),
    "reset_head": one_of("auto", "always", "never"),
    "optimizer": one_of("adamw", "sgd"),
    "lr": above(0),
    "betas": pair_of(fraction()),
    "momentum": fraction(),
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
    "precision": one_of("auto", "fp32", "bf16"),
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
