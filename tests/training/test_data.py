"""lorakit.training.data: file formats, row forms, bad input, prompt masking, overflow, collation; the bundled set."""

from __future__ import annotations

import csv
import datetime as dt
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from lorakit.errors import ConfigError, DataError
from lorakit.training.data import (
    BUNDLED,
    IGNORE_INDEX,
    DataReport,
    build_dataset,
    bundled_path,
    collate,
    eval_pairs,
    load_records,
    render_prompt,
    resolve_data,
    to_messages,
    tokenize_messages,
)

ROOT = Path(__file__).resolve().parents[2]
PC = [{"prompt": "Say hello.", "completion": "hello"}, {"prompt": "Capital of France?", "completion": "Paris"}]
CHAT = [
    {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "hello"}]},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris"},
        ]
    },
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# ------------------------------------------------------------------------------------------------ locating


def test_bundled_files_exist_and_resolve():
    for split in ("train", "eval"):
        path = bundled_path("dates", split)
        assert path.is_file() and path.name == f"{split}.jsonl"
        assert resolve_data(None, split) == path
        assert resolve_data("dates", split) == path
        assert resolve_data("bundled:dates", split) == path
    assert set(BUNDLED) == {"dates"}


def test_bundled_errors_list_what_exists():
    with pytest.raises(DataError, match="bundled: dates.*did you mean 'dates'"):
        bundled_path("date")
    with pytest.raises(DataError, match="splits: train, eval"):
        bundled_path("dates", "test")
    with pytest.raises(DataError, match="no bundled data set 'nope'"):
        resolve_data("bundled:nope", "train")


def test_resolve_data_paths(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", PC)
    assert resolve_data(str(path), "train") == path
    with pytest.raises(DataError, match=r"missing\.jsonl does not exist.*bundled:dates"):
        resolve_data(str(tmp_path / "missing.jsonl"), "train")
    with pytest.raises(DataError, match="is a folder"):
        resolve_data(str(tmp_path), "train")


# ------------------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("rows", [PC, CHAT], ids=["prompt_completion", "messages"])
def test_jsonl_and_json_forms(tmp_path, rows):
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(rows), encoding="utf-8")
    as_data = tmp_path / "data.json"
    as_data.write_text(json.dumps({"data": rows}, indent=2), encoding="utf-8")
    for path in (jsonl, as_list, as_data):
        assert load_records(path) == rows


def test_jsonl_skips_blank_lines_and_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(PC[0]) + "\n\n" + json.dumps({"prompt": "x"}) + "\n", encoding="utf-8")
    assert len(load_records(path)) == 2
    with pytest.raises(DataError, match=r"d\.jsonl, row 2 \(line 3\): missing field 'completion'"):
        eval_pairs(path)


def test_csv_prompt_completion_and_messages_as_json(tmp_path):
    path = write_csv(tmp_path / "d.csv", [{**r, "system": ""} for r in PC])
    assert [to_messages(r, "x") for r in load_records(path)] == [
        [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}] for r in PC
    ]
    path = write_csv(tmp_path / "m.csv", [{"messages": json.dumps(r["messages"])} for r in CHAT])
    assert [to_messages(r, "x") for r in load_records(path)] == [r["messages"] for r in CHAT]


@pytest.mark.parametrize("rows", [PC, CHAT], ids=["prompt_completion", "messages"])
def test_parquet(tmp_path, rows):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    got = load_records(path)
    assert [to_messages(r, "x") for r in got] == [to_messages(r, "x") for r in rows]


def test_parquet_that_is_not_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable parquet file"):
        load_records(path)


# ------------------------------------------------------------------------------------------------ bad files


@pytest.mark.parametrize(
    "name, content",
    [(n, c) for n in ("e.jsonl", "e.json", "e.csv") for c in (b"", b"\n  \n")] + [("e.parquet", b"")],
)
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"{re.escape(name)} is empty.*accepted rows"):
        load_records(path)


def test_empty_containers(tmp_path):
    path = tmp_path / "e.json"
    path.write_text("[]", encoding="utf-8")
    with pytest.raises(DataError, match="holds no rows"):
        load_records(path)
    path = tmp_path / "h.csv"
    path.write_text("prompt,completion\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no rows"):
        load_records(path)


def test_not_utf8_names_offset_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = (json.dumps(PC[0]) + "\n").encode()
    path.write_bytes(good + '{"prompt": "café", "completion": "x"}\n'.encode("latin-1"))
    offset = len(good) + len('{"prompt": "caf')
    with pytest.raises(DataError, match=rf"latin1\.jsonl is not UTF-8 text: byte 0xe9 at offset {offset} \(line 2\)"):
        load_records(path)


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt,completion\nhi,there\n")
    assert load_records(path) == [{"prompt": "hi", "completion": "there"}]
    path.write_bytes(b"\xef\xbb\xbfprompt,completion\nhi,th\xffere\n")
    with pytest.raises(DataError, match=r"byte 0xff at offset 26 \(line 2\)"):
        load_records(path)


def test_bad_json_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(PC[0]) + "\n" + json.dumps(PC[1]) + "\n{prompt: oops}\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: not valid JSON"):
        load_records(path)
    path = tmp_path / "bad.json"
    path.write_text('[\n {"prompt": "a",\n  "completion": }\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json, line 3: not valid JSON"):
        load_records(path)


def test_unknown_extension_lists_accepted(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(
        DataError, match=r"unknown data file extension '\.txt'; accepted: \.jsonl, \.json, \.csv, \.parquet"
    ):
        load_records(path)


def test_rows_that_are_not_objects(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [PC[0], ["a", "b"]])
    with pytest.raises(DataError, match=r"row 2: a row must be a JSON object, not list"):
        load_records(path)
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"rows": PC}), encoding="utf-8")
    with pytest.raises(DataError, match=r"list of row objects or \{\"data\": \[\.\.\.\]\}.*keys \['rows'\]"):
        load_records(path)


def test_csv_row_with_extra_values(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\na,b\nc,d,e\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"row 2 \(line 3\): 1 more values than the 2 header columns"):
        load_records(path)


# ------------------------------------------------------------------------------------------------ row forms


def test_prompt_completion_with_system():
    got = to_messages({"system": "Be brief.", "prompt": "Hi", "completion": "Hello", "id": 7}, "r")
    assert got == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]


@pytest.mark.parametrize(
    "record, pattern",
    [
        ({"prompt": "Hi"}, r"f\.jsonl, row 4: missing field 'completion' \(row has \['prompt'\]\).*accepted rows"),
        ({"question": "Hi", "answer": "x"}, r"missing field 'prompt' and 'completion'"),
        ({"prompt": "Hi", "complition": "x"}, r"unknown field 'complition'; did you mean 'completion'"),
        ({"prompt": "Hi", "completion": 3}, r"'completion' must be a string, not int"),
        ({"prompt": "Hi", "completion": ""}, r"'completion' is empty"),
        ({"prompt": "Hi", "completion": "x", "messages": []}, r"both 'messages' and \['completion', 'prompt'\]"),
        ({"messages": [{"role": "user", "content": "Hi"}]}, r"at least two messages"),
        (
            {"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "x"}]},
            r"the last message is the user's; it must be the assistant's answer",
        ),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "x"}]}, r"accepted roles"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, r"message 1 must be an object"),
        ({"messages": "[not json"}, r"'messages' is a string but not valid JSON"),
    ],
)
def test_bad_rows(record, pattern):
    with pytest.raises(DataError, match=pattern):
        to_messages(record, "f.jsonl, row 4")


def test_bad_row_in_a_file_names_file_and_row(tmp_path):
    path = write_csv(tmp_path / "d.csv", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": ""}])
    with pytest.raises(DataError, match=r"d\.csv, row 2 \(line 3\): 'completion' is empty"):
        eval_pairs(path)


# ------------------------------------------------------------------------------------------------ tokenization


def supervised(example: dict) -> list[int]:
    return [t for t, lab in zip(example["input_ids"], example["labels"]) if lab != IGNORE_INDEX]


@pytest.mark.parametrize("row", PC + CHAT)
def test_labels_mask_exactly_the_prompt(tokenizer, row):
    messages = to_messages(row, "r")
    ex = tokenize_messages(tokenizer, messages, max_length=None)
    assert len(ex["input_ids"]) == len(ex["labels"])
    n_prompt = ex["labels"].index(next(lab for lab in ex["labels"] if lab != IGNORE_INDEX))
    assert all(lab == IGNORE_INDEX for lab in ex["labels"][:n_prompt])
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert tokenizer.decode(ex["input_ids"][:n_prompt]) == render_prompt(tokenizer, messages[:-1])
    assert tokenizer.decode(supervised(ex)) == messages[-1]["content"] + "<|im_end|>"
    assert ex["input_ids"][-1] == tokenizer.eos_token_id  # the template's trailing newline is cut off


def test_default_system_message_of_the_template_is_in_the_prompt(tokenizer):
    ex = tokenize_messages(tokenizer, to_messages(PC[0], "r"), max_length=None)
    assert tokenizer.decode(ex["input_ids"]).startswith("<|im_start|>system\nYou are a test bot.<|im_end|>")


def test_without_chat_template_falls_back_to_plain_text(plain_tokenizer):
    ex = tokenize_messages(plain_tokenizer, to_messages(PC[0], "r"), max_length=None)
    assert plain_tokenizer.decode(ex["input_ids"]) == "Say hello.\nhello<|im_end|>"
    assert plain_tokenizer.decode(supervised(ex)) == "hello<|im_end|>"


def test_truncate_keeps_the_start_and_drop_drops(tokenizer):
    messages = to_messages({"prompt": "Say hello.", "completion": "hello world " * 5}, "r")
    full = tokenize_messages(tokenizer, messages, max_length=None)
    n = len(full["input_ids"])
    cut = tokenize_messages(tokenizer, messages, max_length=n - 3)
    assert cut["input_ids"] == full["input_ids"][: n - 3] and cut["labels"] == full["labels"][: n - 3]
    assert tokenize_messages(tokenizer, messages, max_length=n - 3, overflow="drop") is None
    assert tokenize_messages(tokenizer, messages, max_length=n, overflow="drop") == full
    n_prompt = full["labels"].count(IGNORE_INDEX)
    assert tokenize_messages(tokenizer, messages, max_length=n_prompt) is None  # nothing left to learn


def test_build_dataset_counts_truncated_and_dropped(tokenizer):
    rows = [PC[0], {"prompt": "Say hello.", "completion": "hello " * 12}, {"prompt": "hello " * 40, "completion": "x"}]
    lengths = [len(tokenize_messages(tokenizer, to_messages(r, "r"), None)["input_ids"]) for r in rows]
    limit = lengths[0] + 2
    assert lengths[1] > limit and lengths[2] > limit
    examples, report = build_dataset(rows, tokenizer, max_length=limit, overflow="truncate")
    assert (report.rows, report.used, report.truncated) == (3, 2, 1)
    assert report.dropped == {"prompt alone fills max_length": 1}
    assert report.max_tokens == max(lengths) and report.mean_tokens == pytest.approx(sum(lengths) / 3)
    assert max(len(e["input_ids"]) for e in examples) == limit
    assert report.summary().startswith(
        f"3 rows: 2 used, 1 truncated to {limit} tokens, 1 dropped (1 prompt alone fills max_length)"
    )
    examples, report = build_dataset(rows, tokenizer, max_length=limit, overflow="drop")
    assert (report.used, report.truncated, report.dropped) == (1, 0, {"longer than max_length": 2})
    json.dumps(report.to_dict())


def test_build_dataset_all_dropped_or_bad_settings(tokenizer):
    with pytest.raises(DataError, match=r"none of the 2 rows fits max_length=3.*raise --max-length"):
        build_dataset(PC, tokenizer, max_length=3)
    with pytest.raises(ConfigError, match="overflow='cut' is not accepted; use one of truncate, drop"):
        build_dataset(PC, tokenizer, overflow="cut")
    with pytest.raises(ConfigError, match="max_length=0"):
        tokenize_messages(tokenizer, to_messages(PC[0], "r"), max_length=0)
    with pytest.raises(DataError, match="no rows given"):
        build_dataset([], tokenizer)


def test_build_dataset_from_file_matches_records(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", CHAT)
    from_file, report = build_dataset(path, tokenizer)
    assert from_file == build_dataset(CHAT, tokenizer)[0]
    assert report.path == str(path) and isinstance(report, DataReport)
    assert report.summary().startswith("2 rows: 2 used;")


def test_collate_pads_on_the_right(tokenizer):
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = collate(batch, pad_token_id=2)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in out.values())
    with pytest.raises(ConfigError, match="pad_token_id is None"):
        collate(batch, None)


def test_eval_pairs():
    pairs = eval_pairs(CHAT)
    assert pairs[1] == (CHAT[1]["messages"][:2], "Paris")
    assert eval_pairs(PC)[0] == ([{"role": "user", "content": "Say hello."}], "hello")


# ------------------------------------------------------------------------------------------------ bundled set


def load_script():
    spec = importlib.util.spec_from_file_location("make_dataset", ROOT / "scripts" / "make_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MONTHS = "january february march april may june july august september october november december".split()
WEEKDAYS = "monday tuesday wednesday thursday friday saturday sunday".split()


def parse_english_date(text: str) -> dt.date:
    """An independent parser for the bundled inputs (it checks a given weekday too)."""
    words = re.findall(r"[a-z]+|\d+", text.lower())
    weekday = next((w for w in words if any(d.startswith(w) for d in WEEKDAYS) and len(w) >= 3), None)
    month = next(i + 1 for i, m in enumerate(MONTHS) for w in words if len(w) >= 3 and m.startswith(w))
    numbers = [int(w) for w in words if w.isdigit()]
    year = next(n for n in numbers if n >= 1000)
    day = next(n for n in numbers if n < 1000)
    date = dt.date(year, month, day)
    if weekday:
        assert WEEKDAYS[date.weekday()].startswith(weekday), text
    return date


def test_make_dataset_is_deterministic_and_matches_the_shipped_files(tmp_path):
    script = load_script()
    script.main(["--out", str(tmp_path / "a")])
    script.main(["--out", str(tmp_path / "b")])
    for name in ("train.jsonl", "eval.jsonl", "README.md"):
        first = (tmp_path / "a" / name).read_bytes()
        assert first == (tmp_path / "b" / name).read_bytes()
        assert first == (bundled_path().parent / name).read_bytes(), f"{name}: rerun scripts/make_dataset.py"


def test_bundled_rows_are_correct_and_splits_disjoint():
    script = load_script()
    dates = {}
    for split in ("train", "eval"):
        pairs = eval_pairs(bundled_path("dates", split))
        assert len(pairs) == {"train": script.N_TRAIN, "eval": script.N_EVAL}[split]
        dates[split] = set()
        for prompt, answer in pairs:
            assert [m["role"] for m in prompt] == ["system", "user"] and prompt[0]["content"] == ""
            text = prompt[1]["content"]
            assert text.startswith(script.INSTRUCTION)
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", answer)
            date = dt.date.fromisoformat(answer)
            assert parse_english_date(text[len(script.INSTRUCTION) :]) == date, text
            dates[split].add(date)
    assert len(dates["train"]) == script.N_TRAIN and len(dates["eval"]) == script.N_EVAL
    assert not dates["train"] & dates["eval"]


def test_every_surface_form_is_used_and_parses_back():
    script = load_script()
    for name, render in script.FORMATS.items():
        for date in (dt.date(2021, 3, 5), dt.date(1900, 1, 1), dt.date(2099, 12, 31), dt.date(2000, 2, 29)):
            assert parse_english_date(render(date)) == date, name
    assert [script.ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 31)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "31st"
    ]  # fmt: skip
    texts = [r["messages"][1]["content"][len(script.INSTRUCTION) :] for r in load_records(bundled_path())]
    assert any(t == t.lower() for t in texts) and any("," not in t for t in texts)
