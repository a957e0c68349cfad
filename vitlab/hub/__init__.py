"""Pre-trained checkpoints by name: catalog names, ``hf-hub:`` repos and URLs resolved into local files.

:func:`resolve` is the one place that turns what a user typed where a checkpoint path goes into a local file plus
what its source says about it (preprocessing, class names, the registered model it is). The factory
(:mod:`vitlab.factory`) calls it for anything that is not an existing path, so every command that takes a checkpoint
takes these too:

- a catalog name, ``vit_b16.augreg_in21k_ft_in1k`` (see :mod:`vitlab.models.pretrained`; ``vitlab models
  --pretrained``): its sources are tried in order, a cached one first;
- ``hf-hub:org/name[@revision]``: a Hub repo in timm's or transformers' layout (:mod:`vitlab.hub.hf`);
- ``gs://bucket/path``, ``https://...``, ``http://...``: downloaded into ``$VITLAB_HOME`` (:mod:`vitlab.hub.download`).

:func:`vitlab.create_model` (in :mod:`vitlab.factory`) builds a model with the weights of a catalog entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import VitlabError
from ..models import get_config, has_tokens
from ..models import resolve as resolve_model
from ..models.pretrained import (
    CATALOG,
    DEFAULT_TAGS,
    PretrainedEntry,
    Source,
    get_pretrained,
    is_pretrained_name,
    list_pretrained,
)
from ..models.timm_args import config_overrides
from ..preprocessing import Preprocessing
from .cache import cache_path, hf_cache_dir, offline_mode, vitlab_home
from .download import fetch, placement_hint
from .hf import download_hint, resolve_hub

URL_PREFIXES = ("gs://", "https://", "http://")
HUB_PREFIX = "hf-hub:"

__all__ = ["CATALOG", "DEFAULT_TAGS", "PretrainedEntry", "Resolved", "Source", "cache_path",
           "fetch", "get_pretrained", "hf_cache_dir", "is_checkpoint_name", "is_remote", "list_pretrained",
           "offline_mode", "resolve", "vitlab_home"]


@dataclass
class Resolved:
    """A checkpoint spec resolved to a local ``path``. The rest is what the source says and the file may not:
    the registered model it is (``model_name``, ``grid_hint``), its preprocessing and class names, and the catalog
    entry when it came from one (checked against the file by the reader)."""

    spec: str
    path: Path
    source: str
    entry: PretrainedEntry | None = None
    model_name: str | None = None
    grid_hint: tuple[int, int] | None = None
    preprocessing: Preprocessing | None = None
    class_names: list[str] | None = None
    label_set: str | None = None
    facts: dict = field(default_factory=dict)
    config_overrides: dict = field(default_factory=dict)  # fields of model_name's config the source changes


def is_remote(spec: str) -> bool:
    """Whether ``spec`` names a remote checkpoint (URL or ``hf-hub:``) rather than a local path or catalog name."""
    return spec.startswith(URL_PREFIXES + (HUB_PREFIX,))


def is_checkpoint_name(spec: str) -> bool:
    """Whether ``spec`` is a checkpoint by name rather than by path: a URL, ``hf-hub:`` repo or catalog-style
    ``model.tag`` (existing files excluded). Callers that join relative paths or test ``Path.exists`` ask this."""
    spec = str(spec)
    if Path(spec).exists():
        return False
    return is_remote(spec) or (is_pretrained_name(spec) and _names_a_model(spec))


def resolve(spec: str) -> Resolved | None:
    """Resolve a checkpoint spec that is not an existing path; ``None`` when it is a path (existing or not) so that
    the caller reports the missing file. Raises :class:`VitlabError` for unknown catalog names (with the closest
    ones), missing files when offline, and download or Hub errors."""
    if Path(spec).exists():
        return None
    if spec.startswith(HUB_PREFIX):
        return _from_hub(spec, spec[len(HUB_PREFIX):])
    if spec.startswith(URL_PREFIXES):
        return Resolved(spec, fetch(spec), spec, facts={"source": spec})
    if is_pretrained_name(spec) and _names_a_model(spec):
        try:
            entry = get_pretrained(spec)
        except KeyError as exc:
            raise VitlabError(exc.args[0]) from None
        return resolve_entry(entry, spec)
    return None


def _names_a_model(spec: str) -> bool:
    model = spec.partition(".")[0]
    try:
        resolve_model(model)
    except KeyError:
        return any(e.name.startswith(f"{model}.") for e in CATALOG)
    return True


def _from_hub(spec: str, repo_spec: str, entry: PretrainedEntry | None = None) -> Resolved:
    files = resolve_hub(repo_spec)
    model_name, overrides = None, {}
    if files.architecture:
        try:
            model_name = resolve_model(files.architecture)[0].name
        except KeyError:
            raise VitlabError(f"{spec}: timm architecture {files.architecture!r} is not a model vitlab knows "
                              "(see `vitlab models --aliases`)") from None
        if files.model_args:  # the architecture with timm's keywords changed (a fine-tuned or smaller model)
            try:
                overrides = config_overrides(files.model_args)
                get_config(files.architecture, **overrides)
            except (ValueError, TypeError) as exc:  # InvalidValueError is a ValueError
                raise VitlabError(f"{spec}: config.json model_args do not describe a {files.architecture} "
                                  f"vitlab can build ({str(exc).splitlines()[0]})") from None
    resolved = Resolved(spec, files.path, spec, entry=entry, model_name=model_name, config_overrides=overrides,
                        preprocessing=files.preprocessing, class_names=files.class_names,
                        facts={"source": spec, "hub_repo": files.repo, "hub_layout": files.layout,
                               "hub_revision": files.revision})
    if model_name is not None and files.preprocessing is not None:
        resolved.grid_hint = _grid(model_name, files.preprocessing.img_size, overrides)
    if files.class_names is None and files.num_classes in (1000, 21843):
        resolved.label_set = "imagenet-1k" if files.num_classes == 1000 else "imagenet-21k"
    return resolved


def _grid(model_name: str, img_size, overrides: dict | None = None) -> tuple[int, int] | None:
    try:
        cfg = get_config(model_name, **{**(overrides or {}), "img_size": img_size})
    except (KeyError, ValueError):
        return None
    return tuple(cfg.grid_size) if has_tokens(cfg) else None


def _cached(source: Source) -> bool:
    if source.kind in ("gcs", "url"):
        return cache_path(source.location).is_file()
    folder = hf_cache_dir() / f"models--{source.location.replace('/', '--')}" / "snapshots"
    return folder.is_dir() and any(folder.glob("*/config.json"))


def resolve_entry(entry: PretrainedEntry, spec: str | None = None) -> Resolved:
    """A catalog entry as a local file: the first source already cached, else the sources in order (a failing
    source falls through to the next). Offline, a missing file is an error naming where to place it."""
    spec = spec or entry.name
    ordered = sorted(entry.sources, key=lambda s: not _cached(s))
    if offline_mode() and not _cached(ordered[0]):
        ways = [_placement(source) for source in entry.sources]
        how = ways[0] if len(ways) == 1 else "any one of its sources will do: " + "; or ".join(ways)
        raise VitlabError(f"{spec}: not in the cache and network use is off (VITLAB_OFFLINE / HF_HUB_OFFLINE / "
                          f"--offline); {how}")
    errors = []
    for source in ordered:
        try:
            return _resolve_source(entry, source, spec)
        except VitlabError as exc:
            errors.append(str(exc))
            if offline_mode():
                break
    raise VitlabError(errors[0] if len(errors) == 1 else f"{spec}: no source worked: " + " | ".join(errors))


def _placement(source: Source) -> str:
    """How to put one source's files in the cache by hand."""
    if source.kind in ("gcs", "url"):
        return placement_hint(source.location, cache_path(source.location))
    files = ("config.json", "model.safetensors")
    if source.kind == "transformers":
        files = ("config.json", "preprocessor_config.json", "model.safetensors")
    return download_hint(source.location, files=files)


def _resolve_source(entry: PretrainedEntry, source: Source, spec: str) -> Resolved:
    if source.kind in ("timm", "transformers"):
        resolved = _from_hub(spec, source.location, entry)
    else:
        path = fetch(source.location, size=source.size, sha256=source.sha256)
        pre = entry.preprocessing
        preprocessing = Preprocessing((entry.img_size, entry.img_size), resize=pre.resize, crop_pct=pre.crop_pct,
                                      interpolation=pre.interpolation, mean=pre.mean, std=pre.std)
        resolved = Resolved(spec, path, source.location, entry=entry, preprocessing=preprocessing)
    resolved.source = source.spec
    resolved.entry = entry
    if has_tokens(get_config(entry.model)):  # ViTs and hybrids; CNNs need no model name or grid
        resolved.model_name = entry.model
        resolved.grid_hint = _grid(entry.model, entry.img_size)
    resolved.label_set = resolved.label_set or entry.labels
    resolved.facts.update(catalog_name=entry.name, source=source.spec)
    return resolved
