"""``hf-hub:org/name[@revision]``: a model repo on the Hugging Face Hub, fetched through ``huggingface_hub``.

The Hub's own machinery does the work: its cache (``$HF_HUB_CACHE`` / ``$HF_HOME/hub``), revisions (branch, tag or
commit after ``@``), ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` and the user's token for private or gated repos. Two repo
layouts hold ViTs:

- timm's: ``config.json`` with ``architecture`` and ``pretrained_cfg`` (input size, crop, interpolation, mean / std),
  sometimes ``label_names`` and ``model_args`` (timm keywords that change the architecture, applied through
  :func:`vitlab.models.timm_args.config_overrides`), next to ``model.safetensors`` (or ``pytorch_model.bin``) holding
  a timm state dict (or, as ``vitlab push --layout vitlab`` writes it, a vitlab file);
- transformers': ``config.json`` with ``model_type: vit`` and ``id2label``, ``preprocessor_config.json``, and
  ``model.safetensors`` (possibly sharded) or ``pytorch_model.bin``; read as a Hugging Face model folder.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import VitlabError
from ..preprocessing import Preprocessing
from .cache import hf_cache_dir, offline_mode, reachable
from .download import structure_problem

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HUB_ENDPOINT = "https://huggingface.co"
# transformers model types vitlab reads: the paper's ViT, DeiT, DINOv2 (with registers), SigLIP and CLIP (full
# models or their vision towers)
TRANSFORMERS_MODEL_TYPES = ("vit", "deit", "dinov2", "dinov2_with_registers", "siglip", "siglip_vision_model", "clip",
                            "clip_vision_model", "dinov3_vit")
# the Hub's rules for repo ids (``huggingface_hub.utils.validate_repo_id``: letters, digits, ``-_.``, no ``--`` or
# ``..``, at most 96 characters) and git's for ref names (``git check-ref-format``); a revision becomes a path under
# the cache's ``refs/`` folder, so these rules are what keeps it there
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9_])?", re.ASCII)
_REF_BAD = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|/\.|\.lock(?:/|$)")
_COMMIT = re.compile(r"[0-9a-f]{40}")


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
    model_args: dict | None = None


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``org/name[@revision]`` -> (repo id, revision)."""
    repo, at, revision = spec.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise VitlabError(f"hf-hub:{_shown(spec)}: expected hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    if len(repo) > 96 or "--" in repo or ".." in repo or repo.endswith(".git") \
            or not all(_REPO_PART.fullmatch(part) for part in repo.split("/")):
        raise VitlabError(f"hf-hub:{_shown(spec)}: {_shown(repo)!r} is not a Hub repo id (ORG/NAME: letters, digits, "
                          "'-', '_', '.', no '--' or '..', at most 96 characters)")
    if at and not _valid_revision(revision):
        raise VitlabError(f"hf-hub:{_shown(spec)}: {_shown(revision)!r} is not a revision (a branch or tag name, or a "
                          "40-hex commit; no '..', no leading or trailing '/', no spaces or control characters)")
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


def _valid_revision(revision: str) -> bool:
    """Whether ``revision`` is a git ref name (``git check-ref-format`` rules) or a commit, and so a relative path
    that stays under ``refs/`` and ``snapshots/``."""
    if not revision or len(revision) > 255 or revision == "@" or revision.startswith(("/", ".", "-")) \
            or revision.endswith(("/", ".")) or _REF_BAD.search(revision):
        return False
    return all(len(part.encode()) <= 255 for part in revision.split("/"))


def _shown(text: str) -> str:
    """``text`` cut to 120 characters with control characters escaped, for a one-line message."""
    return text[:120].encode("unicode_escape").decode("ascii")


def _valid_file_name(name: str) -> bool:
    """Whether ``name`` is a file of a repo as the Hub names them: a relative path, no ``..`` / empty / hidden-dot
    parts, no backslash or control characters, each part at most 255 bytes."""
    parts = name.split("/")
    return bool(name) and len(name) <= 1000 and not re.search(r"[\\\x00-\x1f\x7f]", name) \
        and all(part not in ("", ".", "..") and len(part.encode()) <= 255 for part in parts)


def _read_json(path: Path, what: str) -> dict:
    """A repo's JSON file as an object, or one line saying why not (also for what Python's parser fails on beyond
    the standard: nesting past the recursion limit, integers of more than 20 digits, NaN / Infinity)."""
    def integer(digits: str) -> int:
        if len(digits.lstrip("-")) > 20:
            raise ValueError(f"an integer of {len(digits.lstrip('-'))} digits")
        return int(digits)

    def constant(name: str):
        raise ValueError(f"{name} is not a JSON number")

    try:
        data = json.loads(path.read_bytes(), parse_int=integer, parse_constant=constant)
    except RecursionError:
        raise VitlabError(f"{what} is not valid JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise VitlabError(f"{what} is not valid JSON ({_shown(str(exc))})") from None
    except OSError as exc:
        raise VitlabError(f"{what}: cannot read {path} ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise VitlabError(f"{what} is not a JSON object")
    return data


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path``, symlinks followed, is ``root`` or under it."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def _check_hub_answer(response) -> None:
    """An httpx response hook on ``huggingface_hub``'s session: the Hub names cache files after a response's
    ``ETag`` / ``X-Linked-Etag`` (``blobs/<etag>``) and ``X-Repo-Commit`` (``snapshots/<commit>``, ``.no_exist/``)
    without checking them, so a hostile or broken endpoint could make it write outside the cache. Refused here,
    before ``huggingface_hub`` reads them: an ETag must be one path component, a commit 40 hex digits."""
    headers = response.headers
    if "x-repo-commit" not in headers and "/resolve/" not in response.request.url.path:
        return  # not a file answer of the Hub's interface
    commit = headers.get("x-repo-commit")
    if commit is not None and not _COMMIT.fullmatch(commit):
        raise VitlabError(f"{response.request.url.host}: the Hub endpoint answered X-Repo-Commit "
                          f"{_shown(commit)!r}, not a 40-hex commit; refused (HF_ENDPOINT must be a trusted Hub)")
    for name in ("x-linked-etag", "etag"):
        etag = headers.get(name)
        if etag is None:
            continue
        tag = etag.strip()
        tag = (tag[2:] if tag.startswith("W/") else tag).strip('"')
        if not tag or tag in (".", "..") or len(tag) > 255 or re.search(r"[/\\\x00-\x1f\x7f]", tag):
            raise VitlabError(f"{response.request.url.host}: the Hub endpoint answered {name} {_shown(etag)!r}, "
                              "which is not a file name; refused (HF_ENDPOINT must be a trusted Hub)")


def _guard_hub_session() -> None:
    """Put :func:`_check_hub_answer` on ``huggingface_hub``'s shared HTTP session (once per session object: the
    Hub library makes a new one after ``close_session`` or a fork)."""
    from huggingface_hub.utils import get_session

    hooks = get_session().event_hooks
    if _check_hub_answer not in hooks.get("response", []):
        hooks["response"] = [*hooks.get("response", []), _check_hub_answer]


def _download(repo: str, filename: str, revision: str | None, *, optional: bool = False,
              force: bool = False) -> Path | None:
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
        local_only = offline or not hub_reachable()  # an unreachable Hub: the cache only, without its retries
        if not local_only:
            _guard_hub_session()
        found = Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache, local_files_only=local_only,
                                     endpoint=os.environ.get("HF_ENDPOINT") or None, force_download=force))
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
    if not _inside(found, cache):  # a blob or snapshot entry that leads out of the cache is never read
        raise VitlabError(f"{where}: {filename} resolves to {os.path.realpath(found)}, outside the Hub cache {cache}; "
                          "refused (HF_ENDPOINT must be a trusted Hub; delete that entry from the cache)")
    return found


def _whole(repo: str, filename: str, revision: str | None, found: Path) -> Path:
    """``found`` when its structure shows it whole (:func:`~vitlab.hub.download.structure_problem`); otherwise the
    bad blob is deleted and fetched again once (``huggingface_hub`` checks sizes only against what the endpoint
    declares), or, offline, an error naming the file to delete."""
    problem = structure_problem(found)
    if problem is None:
        return found
    where = f"hf-hub:{repo}" + (f"@{revision}" if revision else "")
    blob = Path(os.path.realpath(found))
    if offline_mode():
        raise VitlabError(f"{where}: {filename} in the Hub cache is incomplete or corrupt ({problem}); delete {blob} "
                          f"and {found}, then download it again (network use is off)")
    for path in (blob, found):
        path.unlink(missing_ok=True)
    again = _download(repo, filename, revision, force=True)
    problem = structure_problem(again)
    if problem is not None:
        for path in (Path(os.path.realpath(again)), again):
            path.unlink(missing_ok=True)
        raise VitlabError(f"{where}: the Hub sent an incomplete or corrupt {filename} ({problem}); it was deleted "
                          "from the cache")
    return again


def _weights(repo: str, revision: str | None) -> Path:
    for name in WEIGHT_FILES:
        found = _download(repo, name, revision, optional=True)
        if found is not None:
            return _whole(repo, name, revision, found)
    index = _download(repo, "model.safetensors.index.json", revision, optional=True)
    if index is not None:
        weight_map = _read_json(index, f"hf-hub:{repo}: model.safetensors.index.json").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map \
                or not all(isinstance(v, str) and _valid_file_name(v) for v in weight_map.values()):
            raise VitlabError(f"hf-hub:{repo}: model.safetensors.index.json has no valid 'weight_map' (an object "
                              "from tensor names to shard files in the repo)")
        for shard in sorted(set(weight_map.values())):
            _whole(repo, shard, revision, _download(repo, shard, revision))
        return index
    where = f"hf-hub:{repo}" + (f"@{revision}" if revision else "")
    if offline_mode() or not hub_reachable():  # the config is cached, the weights are not
        why = "network use is off" if offline_mode() else "the Hub cannot be reached"
        raise VitlabError(f"{where}: no model.safetensors, sharded safetensors or pytorch_model.bin in the Hub cache "
                          f"and {why}; {download_hint(repo, revision, ('model.safetensors',))}")
    raise VitlabError(f"{where}: no model.safetensors, sharded safetensors or pytorch_model.bin")


def timm_preprocessing(cfg: dict, in_chans: int = 3) -> Preprocessing | None:
    """A timm ``pretrained_cfg`` as a :class:`Preprocessing` (None when it lacks the fields)."""
    if not isinstance(cfg, dict):
        return None
    size = cfg.get("test_input_size") or cfg.get("input_size")
    if not isinstance(size, list) or len(size) != 3 or not all(type(n) is int and 0 < n <= 65536 for n in size):
        return None
    channels, height, width = size
    squash = cfg.get("crop_mode") == "squash"
    try:  # any field of the wrong type means "no usable preprocessing", as a missing one does
        mean = tuple(cfg.get("mean", (0.5,) * channels))
        std = tuple(cfg.get("std", (0.5,) * channels))
        return Preprocessing((height, width), resize="squash" if squash else "crop",
                             crop_pct=1.0 if squash else float(cfg.get("test_crop_pct") or cfg.get("crop_pct", 1.0)),
                             interpolation=cfg.get("interpolation", "bicubic"), mean=mean, std=std, channels=channels)
    except (TypeError, ValueError, OverflowError):
        return None


def resolve_hub(spec: str) -> HubFiles:
    """Fetch (or find in the cache) what ``hf-hub:spec`` needs and describe it; see the module docstring."""
    repo, revision = parse_spec(spec)
    where = f"hf-hub:{spec}"
    config_file = _download(repo, "config.json", revision)
    config = _read_json(config_file, f"{where}: config.json")
    if "architecture" in config or "pretrained_cfg" in config:  # timm
        arch = config.get("architecture")
        arch = arch if isinstance(arch, str) else ""
        weights = _weights(repo, revision)
        if weights.name.endswith(".index.json"):
            raise VitlabError(f"{where}: sharded timm checkpoints are not supported")
        pretrained_cfg = config.get("pretrained_cfg")
        pretrained_cfg = pretrained_cfg if isinstance(pretrained_cfg, dict) else {}
        labels = config.get("label_names")
        num_classes = config.get("num_classes", pretrained_cfg.get("num_classes"))
        names = [str(n) for n in labels] if isinstance(labels, list) and len(labels) == num_classes \
            and all(isinstance(n, (str, int)) for n in labels) else None
        model_args = config.get("model_args")  # timm's keywords on top of the architecture (timm >= 1.0)
        return HubFiles(weights, "timm", repo, revision, timm_preprocessing(pretrained_cfg), names, arch or None,
                        num_classes if isinstance(num_classes, int) else None,
                        model_args if isinstance(model_args, dict) and model_args else None)
    model_type = config.get("model_type")
    if model_type is not None or "architectures" in config:  # transformers
        if model_type not in TRANSFORMERS_MODEL_TYPES:
            kinds = config.get("architectures")
            kind = model_type if isinstance(model_type, str) else ""
            if not kind and isinstance(kinds, list):
                kind = ", ".join(k for k in kinds if isinstance(k, str))[:100]
            kind = kind or "unknown"
            raise VitlabError(f"{where}: the repo holds a {kind!r} model, not a ViT (model_type one of "
                              f"{', '.join(TRANSFORMERS_MODEL_TYPES)}); vitlab reads ViT repos in the timm or "
                              "transformers layout")
        _download(repo, "preprocessor_config.json", revision, optional=True)
        weights = _weights(repo, revision)
        return HubFiles(weights.parent, "transformers", repo, revision)
    raise VitlabError(f"{where}: config.json has neither timm's 'architecture' nor transformers' 'model_type'; "
                      "the repo holds no ViT vitlab can read")


# what a two-tower (CLIP / SigLIP) repo's tokenizer is read from: transformers' fast tokenizer file, its settings,
# SentencePiece's model (SigLIP), and OpenCLIP's description of the model (repos of OpenCLIP state dicts)
TEXT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model",
              "open_clip_config.json")


OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def fetch_repo_files(spec: str, names: tuple[str, ...] = TEXT_FILES) -> list[Path]:
    """Fetch (or find in the cache) the files of ``org/name[@revision]`` among ``names`` that the repo has, into
    the same snapshot folder as its weights; the ones it lacks are skipped."""
    repo, revision = parse_spec(spec)
    found = (_download(repo, name, revision, optional=True) for name in names)
    return [path for path in found if path is not None]


def resolve_image_text(spec: str) -> Path:
    """The snapshot folder of a two-tower (CLIP / SigLIP) repo ``org/name[@revision]`` with what reading both towers
    needs fetched into it: a transformers ``CLIPModel`` / ``SiglipModel`` (``config.json`` and the weights; the
    layout preferred when a repo has both), else OpenCLIP's files (``open_clip_config.json`` and
    ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``); then the tokenizer's files it has."""
    repo, revision = parse_spec(spec)
    where = f"hf-hub:{spec}"
    config_file = _download(repo, "config.json", revision, optional=True)
    config = _read_json(config_file, f"{where}: config.json") if config_file else {}
    model_type = config.get("model_type")
    if model_type in ("clip", "siglip"):
        folder = _weights(repo, revision).parent
    elif _download(repo, "open_clip_config.json", revision, optional=True) is not None:
        for name in OPEN_CLIP_WEIGHT_FILES:
            found = _download(repo, name, revision, optional=True)
            if found is not None:
                folder = _whole(repo, name, revision, found).parent
                break
        else:
            raise VitlabError(f"{where}: open_clip_config.json but none of {', '.join(OPEN_CLIP_WEIGHT_FILES)}"
                              + ("" if hub_reachable() and not offline_mode() else " in the Hub cache"))
    elif config_file is None:
        _download(repo, "config.json", revision)  # raises the reason: not cached offline, or no such file
        raise VitlabError(f"{where}: the repo has no config.json")
    else:
        kind = f"a {model_type!r} model" if isinstance(model_type, str) else \
            "a timm image model" if "architecture" in config else "no model vitlab recognises"
        raise VitlabError(f"{where}: the repo holds {kind}, not a two-tower image-text model (a transformers "
                          "CLIPModel / SiglipModel, or OpenCLIP's open_clip_config.json and weights); an image "
                          "tower alone loads with vitlab.load")
    fetch_repo_files(spec)
    return folder
