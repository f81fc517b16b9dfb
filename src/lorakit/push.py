"""Uploading an adapter to the Hugging Face hub: the adapter's own files and its model card, nothing else.

``PeftModel.push_to_hub`` would otherwise reach transformers' method on the base model (through attribute
forwarding) and upload the whole base model. Here the adapter is saved by lorakit's ``save_pretrained`` into a
fresh temporary folder (``adapter_config.json``, the weights, ``README.md``, other adapters in subfolders, as
PEFT lays them out) and that folder is uploaded with ``huggingface_hub.HfApi.upload_folder`` in one commit.
The card already on the hub (if any) is fetched first and updated, so text written there is kept.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from lorakit.errors import AdapterFileError, ConfigError, LorakitError, MissingDependencyError

CARD_NAME = "README.md"
#: What a push takes besides the repo id (transformers' and PEFT's names).
PUSH_OPTIONS = ("token", "private", "commit_message", "commit_description", "revision", "create_pr")


def push_options(kwargs: dict[str, Any], where: str, pushing: bool, strict: bool = False) -> dict[str, Any]:
    """Take the push options out of ``kwargs`` (the rest is left there, unless ``strict``).

    Raises:
        ConfigError: a push option given while not pushing (``save_pretrained`` without ``push_to_hub=True``), or
            with ``strict``, any other keyword argument (named).
    """
    found = {name: kwargs.pop(name) for name in PUSH_OPTIONS if name in kwargs}
    if found and not pushing:
        raise ConfigError(
            f"{where} got {', '.join(f'{n}=' for n in found)}, which only a push uses; pass push_to_hub=True to upload "
            "the adapter, or leave them out"
        )
    if strict and kwargs:
        raise ConfigError(
            f"{where} got unknown keyword argument(s) {', '.join(map(repr, kwargs))}; accepted: repo_id, "
            f"safe_serialization, selected_adapters, save_embedding_layers, {', '.join(PUSH_OPTIONS)}"
        )
    return found


def push_adapters(
    model: Any, repo_id: str, names: list[str], saving: dict[str, Any], push: dict[str, Any], **folder: Any
) -> Any:
    """:func:`push_folder` of what ``model.save_pretrained`` writes for the adapters ``names`` (with ``saving``,
    its other arguments); the card names ``repo_id`` as the place to load from."""

    def save(tmp: str) -> None:
        model.save_pretrained(tmp, selected_adapters=names, repo_id=repo_id, **saving)

    return push_folder(save, repo_id, **folder, **push)


def push_folder(
    save: Callable[[str], None],
    repo_id: str,
    *,
    seed_card: str | None = None,
    token: str | bool | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> Any:
    """Create ``repo_id`` if needed and upload, in one commit, exactly what ``save`` writes into an empty folder.

    Args:
        save: writes the adapter into the folder it is given (``PeftModel.save_pretrained``).
        seed_card: a ``README.md`` to start the card from (``save_pretrained(folder, push_to_hub=True)`` gives the
            folder's own); None fetches the repo's current card, if it has one.
        token, private, commit_message, commit_description, revision, create_pr: as in ``huggingface_hub``
            (``private`` only matters when the repo is created).

    Returns:
        ``huggingface_hub``'s ``CommitInfo`` of the upload.

    Raises:
        MissingDependencyError: huggingface_hub is not installed.
        AdapterFileError: the hub refused or could not be reached (the message gives its reason); the upload is
            one commit, so nothing of it was committed (the repo may have been created).
    """
    try:
        from huggingface_hub import HfApi
    except ImportError as exc:  # pragma: no cover - installed with transformers
        raise MissingDependencyError("push_to_hub needs huggingface_hub: pip install huggingface_hub") from exc
    if not isinstance(repo_id, str) or not repo_id:
        raise ConfigError(f"repo_id={repo_id!r} is invalid; accepted: a hub repo id such as 'user/my-adapter'")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        repo_id = url.repo_id if isinstance(getattr(url, "repo_id", None), str) else repo_id
        with tempfile.TemporaryDirectory(prefix="lorakit-push-") as tmp:
            card = seed_card if seed_card is not None else _hub_card(api, repo_id, revision)
            if card is not None and os.path.isfile(card):
                shutil.copyfile(card, os.path.join(tmp, CARD_NAME))
            save(tmp)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                repo_type="model",
                commit_message=commit_message or "Upload adapter with lorakit",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )
    except (OSError, ValueError) as exc:
        if isinstance(exc, LorakitError):  # the save's own errors
            raise
        reason = (str(exc).strip().splitlines() or [""])[0][:300]
        raise AdapterFileError(
            f"cannot push the adapter to hub repo {repo_id!r}: {type(exc).__name__}: {reason}; the upload is one "
            "commit, so none of it was committed (check the repo id, token= and your network)"
        ) from exc


def _hub_card(api: Any, repo_id: str, revision: str | None) -> str | None:
    """The local copy of the repo's ``README.md``, or None when it has none (or the branch does not exist yet)."""
    from huggingface_hub.utils import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        path = api.hf_hub_download(repo_id=repo_id, filename=CARD_NAME, revision=revision)
    except (EntryNotFoundError, RevisionNotFoundError, RepositoryNotFoundError):
        return None
    return os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
