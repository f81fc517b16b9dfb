"""The model card (``README.md``) that ``save_pretrained`` writes beside the adapter files, as PEFT does.

The card is what the Hugging Face hub shows for a repo. Its YAML front matter says what the files are:

* ``library_name: peft``: the files are PEFT's format, so the hub shows PEFT's loading snippet, lists the repo
  as an adapter of its base model and lets inference providers serve it. lorakit is named in the tags
  (``lorakit``) and in the body, which shows how to load the adapter with lorakit and with PEFT. Only an
  adapter of a method PEFT does not have (bottleneck adapters) says ``library_name: lorakit``.
* ``base_model`` (and the tag ``base_model:adapter:<id>``), only when the base model's recorded name is a hub
  repo id: the hub refuses a commit whose ``base_model`` is a local path (transformers issue #33922), so a
  local path is named in the body only.
* ``tags``: ``lorakit``, each method (``lora``, ``ia3``, ``dora`` ...), ``transformers`` for a transformers
  base model; ``pipeline_tag`` from the task type when the card has none.

The body between two marker lines (:data:`BEGIN`, :data:`END`) is lorakit's: the base model, and per adapter
its method, settings (ranks, alpha), target modules and parameter count, then how to load it. Everything else
is the user's. A save into a folder that already holds a card updates it: the front matter's keys are merged
(lorakit sets its own, keeps every other key and tag), lorakit's section is rewritten in place (or appended to
a card without one, such as PEFT's), and every other line is kept. A ``README.md`` with neither front matter
nor lorakit's section is not a model card but the user's own file: it is left exactly as it is, with a warning.

The card is one of the files of the save's atomic unit (:func:`lorakit.io.atomic_write_files`): it is read,
merged and replaced under the folder's lock, together with the adapter at the folder's root.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lorakit.config import PeftConfig, PeftType
from lorakit.errors import AdapterFileError
from lorakit.io import atomic_write_files
from lorakit.persistence import adapter_tensors

CARD_NAME = "README.md"
BEGIN = "<!-- lorakit: the text from here to the closing marker is rewritten by every save; edit outside it -->"
END = "<!-- lorakit: end of the generated section -->"
#: Methods PEFT does not have: a card for them names lorakit as the library (PEFT's snippet would fail).
LORAKIT_ONLY = {PeftType.BOTTLENECK}
#: The hub's pipeline tag and transformers' auto class for each task type.
TASKS = {
    "CAUSAL_LM": ("text-generation", "AutoModelForCausalLM"),
    "SEQ_2_SEQ_LM": (None, "AutoModelForSeq2SeqLM"),
    "SEQ_CLS": ("text-classification", "AutoModelForSequenceClassification"),
    "TOKEN_CLS": ("token-classification", "AutoModelForTokenClassification"),
    "QUESTION_ANS": ("question-answering", "AutoModelForQuestionAnswering"),
    "FEATURE_EXTRACTION": ("feature-extraction", "AutoModel"),
}
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


@dataclass
class CardAdapter:
    """One saved adapter, as the card describes it."""

    name: str
    config: PeftConfig
    parameters: int  #: elements of the adapter's tensors (what its file holds, base embeddings aside)


@dataclass
class CardInfo:
    """What the card says. ``location``: where to load the adapter from (the repo id, or the folder)."""

    adapters: list[CardAdapter]
    base_model: str | None = None
    base_class: str | None = None  #: the base model's class when it is a transformers class
    total_parameters: int | None = None  #: of the whole adapted model, as ``print_trainable_parameters`` counts
    location: str = "path/to/adapter"
    tags: list[str] = field(default_factory=list)  #: more tags (``push_to_hub(tags=...)``)


def is_hub_id(name: str | None) -> bool:
    """Whether ``name`` can be a hub repo id (``name`` or ``owner/name``) and is not an existing local path."""
    return bool(name) and bool(_REPO_ID.match(name)) and ".." not in name and not os.path.exists(name)


def split_front_matter(text: str) -> tuple[dict[str, Any] | None, str]:
    """``(metadata, body)`` of a card; ``(None, text)`` without front matter.

    Raises:
        ValueError: the front matter is not a YAML mapping.
    """
    import yaml

    match = re.match(r"\A\ufeff?---[ \t]*\r?\n(.*?)^---[ \t]*(?:\r?\n|\Z)", text, re.S | re.M)
    if match is None:
        return None, text
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"its YAML front matter does not parse: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"its YAML front matter is a {type(meta).__name__}, not a mapping")
    return meta, text[match.end() :]


def render(info: CardInfo, existing: str | None = None) -> str | None:
    """The card's text: a new one, or ``existing`` updated (see the module docstring); None when ``existing`` is
    not a model card (then it is left alone).

    Raises:
        ValueError: ``existing`` has front matter that does not parse (it is left alone too, by the caller).
    """
    import yaml

    meta, body = ({}, "") if existing is None else split_front_matter(existing)
    if meta is None:
        if BEGIN not in body:
            return None
        meta = {}
    meta = dict(meta)
    types = {a.config.peft_type for a in info.adapters}
    meta["library_name"] = "lorakit" if types & LORAKIT_ONLY else "peft"
    tags = ["lorakit", *info.tags, *sorted({_method_tag(a.config) for a in info.adapters})]
    if any(getattr(a.config, "use_dora", False) for a in info.adapters):
        tags.append("dora")
    if info.base_class is not None:
        tags.append("transformers")
    if is_hub_id(info.base_model):
        meta["base_model"] = info.base_model
        tags.append(f"base_model:adapter:{info.base_model}")
    if isinstance(meta.get("base_model"), str) and not is_hub_id(meta["base_model"]):
        del meta["base_model"]  # '' or a local path (PEFT writes them): the hub would refuse the card
    old_tags = meta.get("tags") or []
    old_tags = [old_tags] if isinstance(old_tags, str) else list(old_tags)
    old_tags = [t for t in old_tags if not (isinstance(t, str) and _bad_adapter_tag(t))]
    meta["tags"] = old_tags + [t for t in dict.fromkeys(tags) if t not in old_tags]
    pipeline = TASKS.get(_task(info), (None, None))[0]
    if pipeline and not meta.get("pipeline_tag"):
        meta["pipeline_tag"] = pipeline
    block = f"{BEGIN}\n{_section(info)}\n{END}"
    if existing is None:
        title = f"{info.adapters[0].config.NAME or 'Adapter'} adapter" + (
            f" for {info.base_model.rstrip('/').rsplit('/', 1)[-1]}" if info.base_model else ""
        )
        body = f"\n# {title}\n\n{block}\n"
    else:
        start, end = body.find(BEGIN), body.find(END)
        if 0 <= start < end:
            body = body[:start] + block + body[end + len(END) :]
        else:
            body = body.rstrip("\n") + f"\n\n{block}\n"
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000)
    return f"---\n{front}---\n{body if body.startswith(chr(10)) else chr(10) + body}"


def card_writers(folder: str | os.PathLike, info: CardInfo) -> dict[str, Callable[[str], None]]:
    """``{"README.md": writer}`` for :func:`lorakit.io.atomic_write_files`, or ``{}`` when the folder's
    ``README.md`` is the user's own file (not a model card), which is then left alone with a warning.

    The writer reads the folder's card again when it runs (under the save's lock), so concurrent saves never
    lose each other's text.
    """
    path = os.path.join(os.fspath(folder), CARD_NAME)
    if _update(path, info) is None:
        return {}

    def write(tmp: str) -> None:
        text = _update(path, info)
        if text is None:  # replaced by a file of the user's since: written back unchanged
            with open(path, encoding="utf-8", errors="surrogateescape") as fh:
                text = fh.read()
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as fh:
            fh.write(text)

    return {CARD_NAME: write}


def adapter_card(
    model: Any, folder: str | os.PathLike, configs: dict[str, PeftConfig], location: str | None = None
) -> dict[str, Callable[[str], None]]:
    """:func:`card_writers` for a ``PeftModel`` saving the adapters ``configs`` (name -> file config) into ``folder``.

    Args:
        location: where the card says to load from (a hub repo id); default ``folder`` as given.
    """
    base = model.get_base_model()
    adapters = [
        CardAdapter(name, config, sum(t.numel() for t in adapter_tensors(model.base_model, name).values()))
        for name, config in configs.items()
    ]
    info = CardInfo(
        adapters,
        base_model=next(iter(configs.values())).base_model_name_or_path,
        base_class=type(base).__name__ if type(base).__module__.startswith("transformers") else None,
        total_parameters=model.get_nb_trainable_parameters()[1],
        location=location or os.fspath(folder),
        tags=[t for t in getattr(base, "model_tags", None) or [] if isinstance(t, str)],
    )
    return card_writers(folder, info)


def write_card(folder: str | os.PathLike, writers: dict[str, Callable[[str], None]]) -> None:
    """Write the card alone (no adapter at the folder's root), atomically.

    Raises:
        AdapterFileError: the folder cannot be created or written.
    """
    try:
        os.makedirs(folder, exist_ok=True)
        atomic_write_files(folder, writers)
    except OSError as exc:
        if isinstance(exc, AdapterFileError):
            raise
        raise AdapterFileError(f"cannot write {CARD_NAME} into {os.fspath(folder)!r}: {exc.strerror or exc}") from exc


def _update(path: str, info: CardInfo) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
            existing: str | None = fh.read()
    except (FileNotFoundError, NotADirectoryError):  # (a folder that cannot exist: the save reports it)
        existing = None
    except OSError as exc:
        raise AdapterFileError(f"cannot read the model card {path!r}: {exc.strerror or exc}") from exc
    try:
        text = render(info, existing)
    except ValueError as exc:
        warnings.warn(f"{path} is left unchanged: {exc}", stacklevel=5)
        return None
    if text is None:
        warnings.warn(
            f"{path} is not a model card (no YAML front matter): it is left unchanged and the saved adapter has "
            "no card; start the file with a '---' line pair to let lorakit maintain its metadata",
            stacklevel=5,
        )
    return text


def _bad_adapter_tag(tag: str) -> bool:
    return tag.startswith("base_model:adapter:") and not is_hub_id(tag[len("base_model:adapter:") :])


def _method_tag(config: PeftConfig) -> str:
    kind = getattr(config.peft_type, "value", config.peft_type)
    return str(kind).lower().replace("_", "-")


def _task(info: CardInfo) -> str | None:
    kind = info.adapters[0].config.task_type
    return getattr(kind, "value", kind)


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _section(info: CardInfo) -> str:
    """lorakit's part of the card: what the adapters are and how to load them."""
    base = info.base_model
    named = f"[`{base}`](https://huggingface.co/{base})" if is_hub_id(base) else f"`{base}`" if base else "not recorded"
    kind = f" (`{info.base_class}`)" if info.base_class else ""
    task = _task(info)
    lines = [
        "## Adapter",
        "",
        f"Base model: {named}{kind}" + (f"; task type `{task}`." if task else "."),
        "",
        "| adapter | folder | method | settings | target modules | parameters |",
        "|---|---|---|---|---|---|",
    ]
    for a in info.adapters:
        targets = getattr(a.config, "target_modules", None)
        if isinstance(targets, (list, tuple, set, frozenset)):
            targets = ", ".join(f"`{t}`" for t in sorted(targets))
        share = f" ({100 * a.parameters / info.total_parameters:.4f}% of {info.total_parameters:,})"
        lines.append(
            f"| `{a.name}` | `{'./' if a.name == 'default' else a.name + '/'}` | {_cell(a.config.NAME)} | "
            f"{_cell(a.config.summary())} | {_cell(targets or '-')} | {a.parameters:,}"
            f"{share if info.total_parameters else ''} |"
        )
    auto = TASKS.get(task, (None, None))[1] or info.base_class or "AutoModel"
    where, model = info.location, base or "path/to/base-model"
    code = [
        f"from transformers import {auto}",
        "from lorakit import PeftModel  # with PEFT: from peft import PeftModel",
        "",
        f'base = {auto}.from_pretrained("{model}")',
    ]
    first, *others = info.adapters
    sub = "" if first.name == "default" else f', subfolder="{first.name}"'
    code.append(f'model = PeftModel.from_pretrained(base, "{where}"{sub}, adapter_name="{first.name}")')
    for a in others:
        code.append(f'model.load_adapter("{where}", adapter_name="{a.name}", subfolder="{a.name}")')
    types = {a.config.peft_type for a in info.adapters}
    peft = (
        "PEFT cannot load it: its method is lorakit's own."
        if types & LORAKIT_ONLY
        else "The files are PEFT's format (`adapter_config.json`, `adapter_model.safetensors`): PEFT loads them "
        "with the same code."
    )
    lines += ["", "## How to load", "", "```python", *code, "```", "", peft, "", f"Saved with lorakit {_version()}."]
    return "\n".join(lines)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorakit")
    except PackageNotFoundError:  # pragma: no cover - a source checkout that was not installed
        return "(source checkout)"
