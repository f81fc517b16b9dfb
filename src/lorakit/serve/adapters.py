"""Which names and folders ``POST /v1/adapters`` accepts.

A runtime load reads only folders under ``--adapter-root``: the path (relative to the root, or absolute) is
resolved, symbolic links and ``..`` included, and must stay inside the resolved root (403 otherwise), so an API
client cannot make the server read arbitrary files. Without ``--adapter-root`` runtime loading is off (403);
adapters given with ``--adapter`` at start-up are the operator's choice and are not confined.
"""

from __future__ import annotations

import re
from pathlib import Path

from lorakit.layers.routing import BASE_ROW
from lorakit.serve.schemas import APIError

#: Adapter names: they appear in URLs (``DELETE /v1/adapters/{name}``), request bodies and metric labels.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(name: str, base_name: str) -> str:
    """``name`` if an adapter may have it; 400 otherwise."""
    if not NAME.fullmatch(name):
        raise APIError(
            400,
            f"adapter name {name!r} is not accepted; use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            param="name",
        )
    if name in (base_name, BASE_ROW):
        raise APIError(409, f"{name!r} names the base model; choose another adapter name", param="name")
    return name


def confined(root: Path | None, path: str) -> Path:
    """The folder ``path`` names, resolved, if it lies under ``root``.

    Raises:
        APIError: 403 when runtime loading is off or the path leaves the root; 404 when no folder is there.
    """
    if root is None:
        raise APIError(403, "loading adapters at runtime is off; start the server with --adapter-root DIR", "path")
    base = root.resolve()
    given = Path(path).expanduser()
    target = (given if given.is_absolute() else base / given).resolve()
    if target != base and base not in target.parents:
        raise APIError(403, f"path {path!r} is outside the adapter root; give a folder under it", param="path")
    if not target.is_dir():
        raise APIError(404, f"no adapter folder at {path!r} under the adapter root", param="path")
    return target
