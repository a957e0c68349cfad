"""Uploading a folder to a Hugging Face Hub model repo through ``huggingface_hub`` (``HfApi.create_repo`` with
``exist_ok=True``, ``create_branch`` for a new revision, then ``upload_folder``: one commit).

The Hub library does the work and reads what it always reads: ``HF_ENDPOINT`` (passed on explicitly, so a value
set after import counts too), the token (``token=``, else ``HF_TOKEN``, else the stored ``hf auth login``).
:func:`vitlab.push_to_hub` writes the folder (:mod:`vitlab.checkpoints.hub_layout`) and calls this.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InvalidValueError, VitlabError
from .cache import offline_mode
from .hf import _shown, _valid_revision, parse_spec

# files that one of vitlab's Hub layouts writes and another does not, and older weight files the readers would take
# instead of the new model.safetensors or next to it: removed from the repo by a push that does not write them
STALE_LAYOUT_FILES = ("preprocessor_config.json", "pytorch_model.bin", "model.safetensors.index.json")


def check_repo_id(repo_id: str, revision: str | None = None) -> None:
    """Refuse a repo id outside the Hub's rules (``ORG/NAME``) or a revision that is not a branch name, in one line
    naming it, before anything is written or sent."""
    if not isinstance(repo_id, str) or "@" in repo_id:
        raise InvalidValueError(f"repo_id {_shown(str(repo_id))!r}: expected ORG/NAME (give a branch with "
                                "revision=, --revision)")
    try:
        parse_spec(repo_id)
    except VitlabError as exc:
        raise InvalidValueError(f"repo_id {str(exc).partition(': ')[2]}") from None
    if revision is not None and (not _valid_revision(revision) or len(revision) == 40
                                 and all(c in "0123456789abcdef" for c in revision)):
        raise InvalidValueError(f"revision {_shown(revision)!r} is not a branch name (no '..', spaces, control "
                                "characters, leading or trailing '/'; not a commit)")


def upload_folder(folder: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
                  commit_message: str | None = None, token: str | None = None) -> dict:
    """Create ``repo_id`` if it does not exist (``private`` then applies), create branch ``revision`` if given and
    new, and upload every file of ``folder`` as one commit. Returns ``repo_id``, ``repo_url``, ``commit_url``,
    ``commit_oid``, ``revision`` and the uploaded ``files``. Hub errors become one-line :class:`VitlabError`s."""
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    check_repo_id(repo_id, revision)
    folder = Path(folder)
    if not folder.is_dir():
        raise VitlabError(f"{folder}: no such folder to upload")
    if offline_mode():
        raise VitlabError(f"push {repo_id}: network use is off (HF_HUB_OFFLINE / VITLAB_OFFLINE); write the folder "
                          "with a dry run (vitlab push --dry-run --out DIR) and upload it later")
    endpoint = os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint, token=token)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        # a file of another layout pushed before (transformers' preprocessor config) would describe the model
        # wrongly next to the new config.json: deleted in the same commit
        stale = [name for name in STALE_LAYOUT_FILES if name not in files]
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, repo_type="model",
                                 commit_message=commit_message or "Upload model with vitlab",
                                 delete_patterns=stale or None)
    except RepositoryNotFoundError:
        raise VitlabError(f"push {repo_id}: the Hub has no such repo and did not create it (log in with `hf auth "
                          "login` or HF_TOKEN, with write access to the namespace)") from None
    except HfHubHTTPError as exc:
        raise VitlabError(f"push {repo_id}: the Hub answered {_shown(str(exc).splitlines()[0])}") from None
    except (OSError, httpx.TransportError) as exc:  # connection refused, DNS, TLS
        raise VitlabError(f"push {repo_id}: cannot reach the Hub at {endpoint or 'huggingface.co'} "
                          f"({_shown(str(exc))})") from None
    return {"repo_id": repo_id, "repo_url": str(repo_url), "commit_url": info.commit_url,
            "commit_oid": info.oid, "revision": revision or "main", "files": files}
