"""Training data: reading files, checking rows, applying the chat template, masking the prompt.

A data file is JSON Lines, JSON (a list of objects, or ``{"data": [...]}``), CSV or parquet. Each row is
either ``{"prompt", "completion"}`` (with an optional ``"system"``) or ``{"messages": [{"role", "content"},
...]}`` whose last message is the assistant's answer. Other keys (``"id"``, ``"source"``, ...) are ignored,
except ones that look like a misspelt field name (``"complition"``), which are reported.

Every row becomes a chat conversation rendered with the tokenizer's chat template. The loss covers the
completion only: each token of the prompt and of the template around it is labelled ``-100``, and the
completion's tokens, up to and including the end-of-turn token that closes the assistant message, are
supervised, so the model also learns to stop. Template text after that token (SmolLM2's trailing newline)
is cut off. A tokenizer without a chat template gets a plain fallback: the prompt messages' contents joined
by newlines, a newline, then the completion and the end-of-sequence token.

Bad data raises :class:`~lorakit.errors.DataError` naming the file, the row (1-based) and what is accepted.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import io
import json
import os
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import ConfigError, DataError, MissingDependencyError, suggest

#: Bundled data sets: name -> folder inside the ``lorakit`` package, holding ``train.jsonl`` and ``eval.jsonl``.
BUNDLED = {"dates": "data/dates"}
BUNDLED_PREFIX = "bundled:"
SPLITS = ("train", "eval")
EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
OVERFLOW_MODES = ("truncate", "drop")
IGNORE_INDEX = -100
#: Room for any bundled example (the longest is 50 SmolLM2 tokens, template included) and short user prompts.
DEFAULT_MAX_LENGTH = 128
ROLES = ("system", "user", "assistant")
FIELDS = ("prompt", "completion", "system", "messages")
FORMS = (
    'accepted rows: {"prompt": "...", "completion": "..."} (optionally with "system"), or '
    '{"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", "content": "..."}]}'
)
#: Tokens that close a chat turn in common templates; the tokenizer's own eos is always included.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
DROP_PROMPT = "prompt alone fills max_length"
DROP_LONG = "longer than max_length"


def bundled_path(name: str = "dates", split: str = "train") -> Path:
    """The file of a bundled data set's split (``"train"`` or ``"eval"``)."""
    if name not in BUNDLED:
        raise DataError(f"no bundled data set {name!r}; bundled: {', '.join(sorted(BUNDLED))}{suggest(name, BUNDLED)}")
    if split not in SPLITS:
        raise DataError(f"bundled data set {name!r} has no split {split!r}; splits: {', '.join(SPLITS)}")
    path = Path(str(resources.files("lorakit").joinpath(BUNDLED[name], f"{split}.jsonl")))
    if not path.is_file():
        raise DataError(f"bundled file {path} is missing from the installed package; reinstall lorakit")
    return path


def resolve_data(spec: str | os.PathLike | None, split: str) -> Path:
    """The data file for ``spec``.

    ``None`` means the default bundled set (``dates``); ``"bundled:NAME"`` always means bundled set NAME, and a
    bare ``"NAME"`` does too unless a file of that name exists. Anything else is a path to a data file.
    ``split`` only selects among a bundled set's files.

    Raises:
        DataError: an unknown bundled name, or a path that is not an existing file.
    """
    if spec is None:
        return bundled_path("dates", split)
    text = os.fspath(spec)
    if text.startswith(BUNDLED_PREFIX):
        return bundled_path(text[len(BUNDLED_PREFIX) :], split)
    path = Path(text).expanduser()
    if text in BUNDLED and not path.exists():
        return bundled_path(text, split)
    if path.is_dir():
        raise DataError(f"{path} is a folder; pass a data file ({', '.join(EXTENSIONS)})")
    if not path.is_file():
        bundled = ", ".join(f"{BUNDLED_PREFIX}{n}" for n in sorted(BUNDLED))
        raise DataError(f"data file {path} does not exist; pass a {'/'.join(EXTENSIONS)} file or {bundled}")
    return path


def load_records(path: str | os.PathLike) -> list[dict]:
    """The rows of a data file, as dicts (not yet checked against the accepted forms).

    Raises:
        DataError: missing or empty file, text that is not UTF-8, invalid JSON (with its line), rows that are not
            objects, an unreadable parquet file, or an extension other than .jsonl/.json/.csv/.parquet.
        MissingDependencyError: a parquet file without ``pyarrow`` installed.
    """
    return [record for _, record in _load_located(path)]


def _load_located(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """``(where, record)`` pairs; ``where`` names the file and the row (and the line when it differs)."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in EXTENSIONS:
        raise DataError(
            f"{path}: unknown data file extension {path.suffix or '(none)'!r}; accepted: {', '.join(EXTENSIONS)}"
        )
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty; it needs at least one row ({FORMS})")
    if ext == ".parquet":
        located = _read_parquet(path)
    else:
        text = _read_text(path)
        if not text.strip():
            raise DataError(f"{path} is empty; it needs at least one row ({FORMS})")
        located = {".jsonl": _parse_jsonl, ".json": _parse_json, ".csv": _parse_csv}[ext](path, text)
    if not located:
        raise DataError(f"{path} holds no rows; it needs at least one ({FORMS})")
    return located


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    skip = 3 if data.startswith(codecs.BOM_UTF8) else 0  # a leading byte-order mark is tolerated
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = skip + exc.start
        line = data[:offset].count(b"\n") + 1
        raise DataError(
            f"{path} is not UTF-8 text: byte 0x{data[offset]:02x} at offset {offset} (line {line}); "
            f"save the file as UTF-8"
        ) from None


def _parse_jsonl(path: Path, text: str) -> list[tuple[str, dict]]:
    located = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}, line {line_no}: not valid JSON ({exc.msg} at column {exc.colno}); "
                f"each line must hold one JSON object"
            ) from None
        where = f"{path}, row {len(located) + 1}" + (f" (line {line_no})" if line_no != len(located) + 1 else "")
        located.append((where, _as_object(record, where)))
    return located


def _parse_json(path: Path, text: str) -> list[tuple[str, dict]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(
            f'{path}: a .json data file must hold a list of row objects or {{"data": [...]}}, '
            f"not a {type(data).__name__}" + (f" with keys {sorted(data)[:8]}" if isinstance(data, dict) else "")
        )
    return [(f"{path}, row {i}", _as_object(r, f"{path}, row {i}")) for i, r in enumerate(data, start=1)]


def _parse_csv(path: Path, text: str) -> list[tuple[str, dict]]:
    extra = "\0extra"  # where DictReader puts values beyond the header's columns
    reader = csv.DictReader(io.StringIO(text, newline=""), restkey=extra)
    if not reader.fieldnames:
        raise DataError(f"{path} has no header row; the first line must name the columns (prompt,completion)")
    located = []
    for i, row in enumerate(reader, start=1):
        where = f"{path}, row {i} (line {reader.line_num})"
        if extra in row:
            raise DataError(f"{where}: {len(row[extra])} more values than the {len(reader.fieldnames)} header columns")
        located.append((where, {k: v for k, v in row.items() if v is not None}))
    return located


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError(
            f"reading {path} needs pyarrow. Install it with:\n    pip install pyarrow"
        ) from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise DataError(f"{path} is not a readable parquet file: {exc}") from None
    return [(f"{path}, row {i}", row) for i, row in enumerate(rows, start=1)]


def _as_object(record: Any, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: a row must be a JSON object, not {type(record).__name__}; {FORMS}")
    return record


def to_messages(record: dict, where: str) -> list[dict]:
    """The chat conversation of one row: ``[{"role", "content"}, ...]`` ending with the assistant's answer.

    Args:
        record: a ``{"prompt", "completion"[, "system"]}`` or ``{"messages": [...]}`` row. In CSV and parquet
            files ``messages`` may be a JSON string. An empty ``system`` in the prompt/completion form means none.
        where: names the row in error messages (e.g. ``"train.jsonl, row 5"``).

    Raises:
        DataError: a missing, mistyped or misspelt field, both forms at once, an unknown role, a conversation
            whose last message is not the assistant's, or an empty completion.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: a row must be an object, not {type(record).__name__}; {FORMS}")
    present = {k for k, v in record.items() if v is not None}
    typos = [f"{k!r}; did you mean {_typo_of(k)!r}?" for k in sorted(present - set(FIELDS), key=str) if _typo_of(k)]
    if typos:
        raise DataError(f"{where}: unknown field {', '.join(typos)}; {FORMS}")
    if "messages" in present:
        mixed = sorted(present & {"prompt", "completion", "system"})
        if mixed:
            raise DataError(f"{where}: has both 'messages' and {mixed}; use one form per row. {FORMS}")
        return _check_messages(record["messages"], where)
    missing = [k for k in ("prompt", "completion") if k not in present]
    if missing:
        others = sorted(present, key=str)
        raise DataError(f"{where}: missing field {' and '.join(repr(m) for m in missing)} (row has {others}); {FORMS}")
    messages = []
    system = record.get("system")
    if system is not None and system != "":
        messages.append({"role": "system", "content": _string(system, "system", where)})
    messages.append({"role": "user", "content": _string(record["prompt"], "prompt", where)})
    messages.append({"role": "assistant", "content": _string(record["completion"], "completion", where)})
    if not messages[-1]["content"]:
        raise DataError(f"{where}: 'completion' is empty; there would be nothing to learn")
    return messages


def _typo_of(key: Any) -> str | None:
    """The field name ``key`` is probably a misspelling of (``"complition"``), or None for an unrelated key."""
    close = difflib.get_close_matches(str(key), FIELDS, n=1, cutoff=0.75)
    return close[0] if close else None


def _string(value: Any, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {name!r} must be a string, not {type(value).__name__} ({value!r:.40})")
    return value


def _check_messages(messages: Any, where: str) -> list[dict]:
    if isinstance(messages, str):  # CSV and parquet files store the list as JSON text
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: 'messages' is a string but not valid JSON ({exc.msg})") from None
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(
            f"{where}: 'messages' must be a list of at least two messages (a prompt, then the assistant's answer); "
            f"got {messages!r:.80}"
        )
    checked = []
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: message {i} must be an object with 'role' and 'content'; got {message!r:.80}")
        role = message["role"]
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has role {role!r}; accepted roles: {', '.join(ROLES)}")
        checked.append({"role": role, "content": _string(message["content"], f"message {i} content", where)})
    if checked[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: the last message is the {checked[-1]['role']}'s; it must be the assistant's answer "
            f"(the completion the model learns)"
        )
    if not checked[-1]["content"]:
        raise DataError(f"{where}: the assistant's last message is empty; there would be nothing to learn")
    return checked


# --------------------------------------------------------------------------------------------- tokenization


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Ids that end an assistant turn: the tokenizer's eos plus known end-of-turn tokens in its vocabulary."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    for token in END_OF_TURN_TOKENS:
        i = tokenizer.convert_tokens_to_ids(token)  # the unknown token's id when absent: checked by mapping back
        if isinstance(i, int) and i not in ids and tokenizer.convert_ids_to_tokens(i) == token:
            ids.append(i)
    return ids


def render_prompt(tokenizer: Any, messages: Sequence[dict]) -> str:
    """The text the model sees before it answers: the chat template with the generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages) + "\n"


def _render_full(tokenizer: Any, messages: Sequence[dict]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False)
    return render_prompt(tokenizer, messages[:-1]) + messages[-1]["content"]


def _ids(tokenizer: Any, text: str) -> list[int]:
    # The template already wrote any special tokens it wants; letting the tokenizer add a BOS would double it.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_limits(max_length: int | None, overflow: str) -> None:
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ConfigError(f"max_length={max_length!r} is not accepted; use a positive number of tokens or None")
    if overflow not in OVERFLOW_MODES:
        raise ConfigError(f"overflow={overflow!r} is not accepted; use one of {', '.join(OVERFLOW_MODES)}")


def _encode(
    tokenizer: Any, messages: Sequence[dict], max_length: int | None, overflow: str
) -> tuple[dict | None, int, str]:
    """``(example or None, untruncated length, status)``; status is "ok", "truncated" or a drop reason."""
    prompt_text = render_prompt(tokenizer, messages[:-1])
    full_text = _render_full(tokenizer, messages)
    if not full_text.startswith(prompt_text):
        raise DataError(
            "the tokenizer's chat template renders a conversation that does not start with the same conversation's "
            "generation prompt, so the completion cannot be located; use a model whose template appends the "
            f"answer after add_generation_prompt (prompt ends {prompt_text[-40:]!r}, full text {full_text[:80]!r})"
        )
    prompt_ids = _ids(tokenizer, prompt_text)
    full_ids = _ids(tokenizer, full_text)
    if full_ids[: len(prompt_ids)] == prompt_ids:
        completion = full_ids[len(prompt_ids) :]
    else:  # a BPE merge across the boundary: tokenize the two parts apart so the boundary stays exact
        completion = _ids(tokenizer, full_text[len(prompt_text) :])
    stops = set(end_of_turn_ids(tokenizer))
    ends = [i for i, t in enumerate(completion) if t in stops]
    if ends:
        completion = completion[: ends[-1] + 1]  # drop template text after the closing token (a newline)
    elif tokenizer.eos_token_id is not None:
        completion = completion + [tokenizer.eos_token_id]
    input_ids = prompt_ids + completion
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion
    length = len(input_ids)
    status = "ok"
    if max_length is not None and length > max_length:
        if overflow == "drop":
            return None, length, DROP_LONG
        if len(prompt_ids) >= max_length:
            return None, length, DROP_PROMPT
        input_ids, labels, status = input_ids[:max_length], labels[:max_length], "truncated"
    return {"input_ids": input_ids, "labels": labels}, length, status


def tokenize_messages(
    tokenizer: Any, messages: Sequence[dict], max_length: int | None, overflow: str = "truncate"
) -> dict | None:
    """Token ids and labels of one conversation, or ``None`` when it must be dropped.

    Args:
        messages: a conversation from :func:`to_messages`; its last message is the completion.
        max_length: the most tokens kept (``None``: no limit).
        overflow: ``"truncate"`` keeps the first ``max_length`` tokens (and drops the example when the prompt
            alone fills them, leaving nothing supervised); ``"drop"`` drops every example over ``max_length``.

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` of equal length; ``labels`` is ``-100`` on every prompt and
        template token and equals ``input_ids`` on the completion (ending with the end-of-turn token).

    Raises:
        ConfigError: an ``overflow`` other than ``"truncate"`` or ``"drop"``.
        DataError: a chat template whose full rendering does not start with its generation prompt.
    """
    _check_limits(max_length, overflow)
    return _encode(tokenizer, messages, max_length, overflow)[0]


@dataclass
class DataReport:
    """What :func:`build_dataset` did with a file. Token counts are measured before truncation."""

    path: str
    rows: int = 0
    used: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    max_tokens: int = 0
    mean_tokens: float = 0.0
    max_length: int | None = None

    @property
    def dropped_total(self) -> int:
        """How many rows were dropped, for any reason."""
        return sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready values (for ``metrics.json``)."""
        return {**asdict(self), "dropped_total": self.dropped_total, "summary": self.summary()}

    def summary(self) -> str:
        """One line, e.g. ``"2000 rows: 1990 used, 7 truncated to 64 tokens, 3 dropped (...); longest 71 ..."``."""
        parts = [f"{self.rows} rows: {self.used} used"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to {self.max_length} tokens")
        if self.dropped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in self.dropped.items())
            parts.append(f"{self.dropped_total} dropped ({reasons})")
        return ", ".join(parts) + f"; longest {self.max_tokens} tokens, mean {self.mean_tokens:.1f}"


def build_dataset(
    path_or_records: str | os.PathLike | Iterable[dict],
    tokenizer: Any,
    max_length: int | None = DEFAULT_MAX_LENGTH,
    overflow: str = "truncate",
) -> tuple[list[dict], DataReport]:
    """Tokenized training examples (see :func:`tokenize_messages`) and a report of what was kept.

    Args:
        path_or_records: a data file, or rows already loaded (named ``<records>`` in messages).

    Raises:
        DataError: any bad row (see :func:`load_records`, :func:`to_messages`), or no row left after dropping.
        ConfigError: an unknown ``overflow``.
    """
    _check_limits(max_length, overflow)
    located, name = _locate(path_or_records)
    report = DataReport(path=name, rows=len(located), max_length=max_length)
    examples, lengths, dropped = [], [], Counter()
    for where, record in located:
        example, length, status = _encode(tokenizer, to_messages(record, where), max_length, overflow)
        lengths.append(length)
        if example is None:
            dropped[status] += 1
            continue
        report.truncated += status == "truncated"
        examples.append(example)
    report.used = len(examples)
    report.dropped = dict(dropped)
    report.max_tokens = max(lengths)
    report.mean_tokens = statistics.fmean(lengths)
    if not examples:
        raise DataError(
            f"{name}: none of the {report.rows} rows fits max_length={max_length} ({report.summary()}); "
            f"raise --max-length"
        )
    return examples, report


def _locate(path_or_records: str | os.PathLike | Iterable[dict]) -> tuple[list[tuple[str, dict]], str]:
    if isinstance(path_or_records, (str, os.PathLike)):
        return _load_located(path_or_records), os.fspath(path_or_records)
    located = [(f"<records>, row {i}", r) for i, r in enumerate(path_or_records, start=1)]
    if not located:
        raise DataError(f"no rows given; {FORMS}")
    return located, "<records>"


def collate(batch: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into ``(B, T)`` tensors: input_ids, attention_mask, labels.

    Padding positions get ``pad_token_id``, attention 0 and label ``-100`` (whatever the pad id is: it is
    often the eos id, which is supervised elsewhere).
    """
    if pad_token_id is None:
        raise ConfigError("pad_token_id is None; set tokenizer.pad_token (e.g. to tokenizer.eos_token)")
    width = max(len(ex["input_ids"]) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex["input_ids"])
        input_ids[i, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.tensor(ex["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def eval_pairs(path_or_records: str | os.PathLike | Iterable[dict]) -> list[tuple[list[dict], str]]:
    """``(prompt messages, expected answer)`` for every row, for exact-match evaluation."""
    located, _ = _locate(path_or_records)
    pairs = []
    for where, record in located:
        messages = to_messages(record, where)
        pairs.append((messages[:-1], messages[-1]["content"]))
    return pairs
