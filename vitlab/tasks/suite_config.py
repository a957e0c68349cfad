"""The suite config: a list of tasks run with one protocol (VTAB-1k style), read from TOML or JSON.

Example (TOML)::

    name = "mini-vtab"
    mode = "fewshot"            # or "finetune", or "zero-shot" (an image-text checkpoint); a task may override it
    train_examples = 1000       # VTAB-1k: 1000 training images per task ...
    val_examples = 200          # ... of which 200 pick the hyper-parameter (800 / 200), then all 1000 train
    test_examples = 2000        # optional cap on the test set (a seeded random subset); default: all
    seed = 0
    groups = true               # report group means (natural / specialized / structured)

    [finetune]                  # the VTAB recipe; any key may be overridden per task
    steps = 2500
    lr = [0.01]                 # several values: each is tried on 800 / 200, the best retrains on 1000
    batch_size = 512
    resolution = 384            # optional; default the checkpoint's

    [fewshot]
    method = "lsr"              # lsr, knn or linear
    representation = "pre_logits"

    [zero_shot]                 # CLIP / SigLIP: the data's class names in prompt templates, no training
    templates = ["a photo of a {}."]

    [[task]]
    name = "fmnist"
    data = "fashion-mnist"      # a named dataset or an image folder
    group = "natural"
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import VitlabError
from ..evaluate.features import REPRESENTATIONS
from ..evaluate.probes import PROBES
from ..hub import is_checkpoint_name

MODES = ("fewshot", "finetune", "zero-shot")
VTAB_GROUPS = ("natural", "specialized", "structured")
FINETUNE_DEFAULTS = {"steps": 2500, "lr": [0.01], "batch_size": 512, "resolution": None, "warmup_steps": None}
FEWSHOT_DEFAULTS = {"method": "lsr", "representation": "pre_logits", "grid": None, "batch_size": 256}
ZERO_SHOT_DEFAULTS = {"templates": ["a photo of a {}."], "batch_size": 256}
_TOP_KEYS = {"name", "checkpoint", "mode", "train_examples", "val_examples", "test_examples", "seed", "groups",
             "finetune", "fewshot", "zero_shot", "task", "tasks", "num_workers"}
_TASK_KEYS = {"name", "data", "group", "mode", "train_split", "test_split", "train_examples", "val_examples",
              "test_examples", "finetune", "fewshot", "zero_shot"}


@dataclass(frozen=True)
class TaskConfig:
    """One task of a suite: where its data comes from and how it is scored."""
    name: str
    data: str
    mode: str
    group: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    train_examples: int = 1000
    val_examples: int = 200
    test_examples: int | None = None
    finetune: dict = field(default_factory=dict)
    fewshot: dict = field(default_factory=dict)
    zero_shot: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SuiteConfig:
    """A whole suite: its tasks, the checkpoint (optional, the CLI may give it) and the shared settings."""
    name: str
    tasks: tuple[TaskConfig, ...]
    checkpoint: str | None = None
    seed: int = 0
    groups: bool = False
    num_workers: int = 0
    base_dir: str = "."

    def to_dict(self) -> dict:
        out = asdict(self)
        out["tasks"] = [t.to_dict() for t in self.tasks]
        return out


def _merge(defaults: dict, *overrides: dict, where: str) -> dict:
    out = dict(defaults)
    for override in overrides:
        unknown = sorted(set(override) - set(defaults))
        if unknown:
            raise VitlabError(f"{where}: unknown keys {', '.join(unknown)} (known: {', '.join(defaults)})")
        out.update(override)
    return out


def _positive_int(value, what: str, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise VitlabError(f"{what} must be a positive integer, got {value!r}")
    return value


def parse_suite_config(data: dict, source: str = "suite config", base_dir: str | Path = ".") -> SuiteConfig:
    """Validate a suite config dict (see the module docstring) and fill in the defaults.

    Relative image-folder paths and the checkpoint path are taken relative to ``base_dir`` (the config's folder)."""
    if not isinstance(data, dict):
        raise VitlabError(f"{source}: the top level must be a table / object")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise VitlabError(f"{source}: unknown keys {', '.join(unknown)}")
    raw_tasks = data.get("task", data.get("tasks"))
    if not raw_tasks or not isinstance(raw_tasks, list):
        raise VitlabError(f"{source}: no tasks; add [[task]] tables with at least name and data")
    base_dir = Path(base_dir)
    tasks, seen = [], set()
    for i, raw in enumerate(raw_tasks):
        where = f"{source}: task {i + 1}"
        if not isinstance(raw, dict):
            raise VitlabError(f"{where} must be a table / object")
        unknown = sorted(set(raw) - _TASK_KEYS)
        if unknown:
            raise VitlabError(f"{where}: unknown keys {', '.join(unknown)}")
        for key in ("name", "data"):
            if not isinstance(raw.get(key), str) or not raw[key]:
                raise VitlabError(f"{where}: '{key}' (a string) is required")
        name = raw["name"]
        where = f"{source}: task {name!r}"
        if name in seen:
            raise VitlabError(f"{source}: task name {name!r} is used twice")
        if "/" in name or name.startswith("."):
            raise VitlabError(f"{where}: the name becomes a folder name; no '/' or leading '.'")
        seen.add(name)
        mode = raw.get("mode", data.get("mode", "fewshot"))
        if mode not in MODES:
            raise VitlabError(f"{where}: mode must be one of {', '.join(MODES)}, got {mode!r}")
        train_examples = _positive_int(raw.get("train_examples", data.get("train_examples", 1000)),
                                       f"{where}: train_examples")
        val_examples = _positive_int(raw.get("val_examples", data.get("val_examples", 200)), f"{where}: val_examples")
        if val_examples >= train_examples:
            raise VitlabError(f"{where}: val_examples ({val_examples}) must be smaller than train_examples "
                              f"({train_examples})")
        test_examples = _positive_int(raw.get("test_examples", data.get("test_examples")), f"{where}: test_examples",
                                      allow_none=True)
        finetune = _merge(FINETUNE_DEFAULTS, data.get("finetune", {}), raw.get("finetune", {}),
                          where=f"{where}: finetune")
        if not isinstance(finetune["lr"], list):
            finetune["lr"] = [finetune["lr"]]
        if not finetune["lr"] or any(not isinstance(v, (int, float)) or v <= 0 for v in finetune["lr"]):
            raise VitlabError(f"{where}: finetune lr must be a positive number or a list of them")
        _positive_int(finetune["steps"], f"{where}: finetune steps")
        _positive_int(finetune["batch_size"], f"{where}: finetune batch_size")
        _positive_int(finetune["resolution"], f"{where}: finetune resolution", allow_none=True)
        fewshot = _merge(FEWSHOT_DEFAULTS, data.get("fewshot", {}), raw.get("fewshot", {}), where=f"{where}: fewshot")
        if fewshot["method"] not in PROBES:
            raise VitlabError(f"{where}: fewshot method must be one of {', '.join(PROBES)}, got {fewshot['method']!r}")
        if fewshot["representation"] not in REPRESENTATIONS:
            raise VitlabError(f"{where}: representation must be one of {', '.join(REPRESENTATIONS)}")
        zero_shot = _merge(ZERO_SHOT_DEFAULTS, data.get("zero_shot", {}), raw.get("zero_shot", {}),
                           where=f"{where}: zero_shot")
        templates = zero_shot["templates"]
        if isinstance(templates, str):
            templates = zero_shot["templates"] = [templates]
        if not isinstance(templates, list) or not templates or any(
                not isinstance(t, str) or t.count("{}") != 1 for t in templates):
            raise VitlabError(f"{where}: zero_shot templates must be a list of prompts, each with {{}} once where "
                              "the class name goes")
        _positive_int(zero_shot["batch_size"], f"{where}: zero_shot batch_size")
        group = raw.get("group")
        if group is not None and not isinstance(group, str):
            raise VitlabError(f"{where}: group must be a string")
        data_ref = raw["data"]
        if not Path(data_ref).is_absolute() and (base_dir / data_ref).exists():  # an image folder beside the config
            data_ref = str(base_dir / data_ref)
        tasks.append(TaskConfig(
            name=name, data=data_ref, mode=mode, group=group, train_split=raw.get("train_split", "train"),
            test_split=raw.get("test_split", "test"), train_examples=train_examples, val_examples=val_examples,
            test_examples=test_examples, finetune=finetune, fewshot=fewshot, zero_shot=zero_shot,
        ))
    use_groups = bool(data.get("groups", False))
    if use_groups:
        missing = [t.name for t in tasks if not t.group]
        if missing:
            raise VitlabError(f"{source}: groups = true but tasks {', '.join(missing)} have no group")
    checkpoint = data.get("checkpoint")
    if checkpoint is not None:

        if not (Path(checkpoint).is_absolute() or is_checkpoint_name(str(checkpoint))):  # names stay names
            checkpoint = str(base_dir / checkpoint)
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise VitlabError(f"{source}: seed must be an integer")
    return SuiteConfig(name=str(data.get("name", "suite")), tasks=tuple(tasks), checkpoint=checkpoint, seed=seed,
                       groups=use_groups, num_workers=int(data.get("num_workers", 0)), base_dir=str(base_dir))


def load_suite_config(path: str | Path) -> SuiteConfig:
    """Read a suite config from a ``.toml`` or ``.json`` file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise VitlabError(f"suite config {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError:  # an image or a checkpoint given in its place
        raise VitlabError(f"suite config {path}: not a text file (a TOML or JSON config is UTF-8 text)") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise VitlabError(f"suite config {path}: not valid JSON: {exc}") from exc
    else:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            raise VitlabError(f"suite config {path}: reading TOML needs Python 3.11 or later; use JSON") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise VitlabError(f"suite config {path}: not valid TOML: {exc}") from exc
    return parse_suite_config(data, source=str(path), base_dir=path.parent)
