"""``hf-hub:org/name[@revision]``: a model repo on the Hugging Face Hub, fetched through ``huggingface_hub``.

The Hub's own machinery does the work: its cache (``$HF_HUB_CACHE`` / ``$HF_HOME/hub``), revisions (branch, tag or
commit after ``@``), ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` and the user's token for private or gated repos. Two repo
layouts hold ViTs:

- timm's: ``config.json`` with ``architecture`` and ``pretrained_cfg`` (input size, crop, interpolation, mean / std),
  sometimes ``label_names``, next to ``model.safetensors`` (or ``pytorch_model.bin``) holding a timm state dict;
- transformers': ``config.json`` with ``model_type: vit`` and ``id2label``, ``preprocessor_config.json``, and
  ``model.safetensors`` (possibly sharded) or ``pytorch_model.bin``; read as a Hugging Face model folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import VitlabError
from ..preprocessing import Preprocessing
from .cache import hf_cache_dir, offline_mode, reachable

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HUB_ENDPOINT = "https://huggingface.co"


@dataclass
class HubFiles:
    """What a Hub repo resolved to: ``path`` (the weights file for timm's layout, the snapshot folder for
    transformers'), the layout, and what the repo says about preprocessing, class names and architecture."""

    path: Path
    layout: str
    repo: str
    revision: str | None
    preprocessing: Preprocessing | None = None
    class_names: list[str] | None = None
    architecture: str | None = None
    num_classes: int | None = None


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``org/name[@revision]`` -> (repo id, revision)."""
    repo, _, revision = spec.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise VitlabError(f"hf-hub:{spec}: expected hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    return repo, revision or None


def hub_reachable() -> bool:
    """Whether the Hub endpoint (``$HF_ENDPOINT``, default huggingface.co) accepts connections; probed once."""
    return reachable(os.environ.get("HF_ENDPOINT") or HUB_ENDPOINT)


def download_hint(repo: str, revision: str | None = None, files: tuple[str, ...] = ("config.json",
                                                                                   "model.safetensors")) -> str:
    """The ``hf download`` command that puts what vitlab reads of ``repo`` (its config and weights by default) in
    this machine's Hub cache, and where the files go (the last part of the offline / no-network messages)."""
    cache = hf_cache_dir()
    revision_option = f" --revision {revision}" if revision else ""
    folder = cache / f"models--{repo.replace('/', '--')}"
    return (f"on a connected machine run `hf download {repo} {' '.join(files)}{revision_option} --cache-dir "
            f"'{cache}'` (the files go to {folder}; if that machine is another one, copy the folder to the same "
            f"place here or point HF_HUB_CACHE at a copy)")


def _download(repo: str, filename: str, revision: str | None, *, optional: bool = False) -> Path | None:
    """One file of the repo through ``hf_hub_download`` (cache first; network only when allowed)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"hf-hub:{repo}" + (f"@{revision}" if revision else "")
    cache = hf_cache_dir()
    offline = offline_mode()
    try:
        # an unreachable Hub: the cache only, without huggingface_hub's retries
        return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache,
                                    local_files_only=offline or not hub_reachable(),
                                    endpoint=os.environ.get("HF_ENDPOINT") or None))
    except LocalEntryNotFoundError:  # not cached, and offline or the Hub unreachable
        if optional:
            return None
        why = "network use is off (HF_HUB_OFFLINE / VITLAB_OFFLINE / --offline)" if offline else \
            "the Hub cannot be reached"
        folder = cache / f"models--{repo.replace('/', '--')}"
        files = ("config.json", "model.safetensors") if filename == "config.json" else (filename,)
        raise VitlabError(f"{where}: {filename} is not in the Hub cache ({folder}) and {why}; "
                          f"{download_hint(repo, revision, files)}") from None
    except GatedRepoError:
        raise VitlabError(f"{where}: a gated repo; accept its terms on the Hub and log in (`hf auth login` or "
                          "HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise VitlabError(f"{where}: no such repo on the Hub (a private one needs `hf auth login` or HF_TOKEN)"
                          ) from None
    except RevisionNotFoundError:
        raise VitlabError(f"{where}: the repo has no revision {revision!r}") from None
    except EntryNotFoundError:
        if optional:
            return None
        raise VitlabError(f"{where}: the repo has no {filename}") from None
    except HfHubHTTPError as exc:
        raise VitlabError(f"{where}: the Hub answered {str(exc).splitlines()[0]}") from None
    except (OSError, ValueError) as exc:
        raise VitlabError(f"{where}: cannot fetch {filename} ({exc})") from None


def _weights(repo: str, revision: str | None) -> Path:
    for name in WEIGHT_FILES:
        found = _download(repo, name, revision, optional=True)
        if found is not None:
            return found
    index = _download(repo, "model.safetensors.index.json", revision, optional=True)
    if index is not None:
        try:
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        except json.JSONDecodeError as exc:
            raise VitlabError(f"{index}: not valid JSON ({exc})") from None
        for shard in shards:
            _download(repo, shard, revision)
        return index
    where = f"hf-hub:{repo}" + (f"@{revision}" if revision else "")
    if offline_mode() or not hub_reachable():  # the config is cached, the weights are not
        why = "network use is off" if offline_mode() else "the Hub cannot be reached"
        raise VitlabError(f"{where}: no model.safetensors, sharded safetensors or pytorch_model.bin in the Hub cache "
                          f"and {why}; {download_hint(repo, revision, ('model.safetensors',))}")
    raise VitlabError(f"{where}: no model.safetensors, sharded safetensors or pytorch_model.bin")


def timm_preprocessing(cfg: dict, in_chans: int = 3) -> Preprocessing | None:
    """A timm ``pretrained_cfg`` as a :class:`Preprocessing` (None when it lacks the fields)."""
    size = cfg.get("test_input_size") or cfg.get("input_size")
    if not size or len(size) != 3:
        return None
    channels, height, width = size
    mean = tuple(cfg.get("mean", (0.5,) * channels))
    std = tuple(cfg.get("std", (0.5,) * channels))
    squash = cfg.get("crop_mode") == "squash"
    try:
        return Preprocessing((height, width), resize="squash" if squash else "crop",
                             crop_pct=1.0 if squash else float(cfg.get("test_crop_pct") or cfg.get("crop_pct", 1.0)),
                             interpolation=cfg.get("interpolation", "bicubic"), mean=mean, std=std, channels=channels)
    except ValueError:
        return None


def resolve_hub(spec: str) -> HubFiles:
    """Fetch (or find in the cache) what ``hf-hub:spec`` needs and describe it; see the module docstring."""
    repo, revision = parse_spec(spec)
    where = f"hf-hub:{spec}"
    config_file = _download(repo, "config.json", revision)
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VitlabError(f"{where}: config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise VitlabError(f"{where}: config.json is not a JSON object")
    if "architecture" in config or "pretrained_cfg" in config:  # timm
        arch = str(config.get("architecture", ""))
        weights = _weights(repo, revision)
        if weights.name.endswith(".index.json"):
            raise VitlabError(f"{where}: sharded timm checkpoints are not supported")
        pretrained_cfg = config.get("pretrained_cfg") or {}
        labels = config.get("label_names")
        num_classes = config.get("num_classes", pretrained_cfg.get("num_classes"))
        names = [str(n) for n in labels] if isinstance(labels, list) and len(labels) == num_classes else None
        return HubFiles(weights, "timm", repo, revision, timm_preprocessing(pretrained_cfg), names, arch or None,
                        num_classes if isinstance(num_classes, int) else None)
    model_type = config.get("model_type")
    if model_type is not None or "architectures" in config:  # transformers
        if model_type != "vit":
            kind = model_type or ", ".join(config.get("architectures") or []) or "unknown"
            raise VitlabError(f"{where}: the repo holds a {kind!r} model, not a ViT (model_type 'vit'); vitlab reads "
                              "ViT repos in the timm or transformers layout")
        _download(repo, "preprocessor_config.json", revision, optional=True)
        weights = _weights(repo, revision)
        return HubFiles(weights.parent, "transformers", repo, revision)
    raise VitlabError(f"{where}: config.json has neither timm's 'architecture' nor transformers' 'model_type'; "
                      "the repo holds no ViT vitlab can read")
