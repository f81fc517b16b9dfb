"""Generate lorakit's bundled ``dates`` task: English dates -> ISO 8601 (``YYYY-MM-DD``).

    python scripts/make_dataset.py            # rewrites src/lorakit/data/dates/{train,eval}.jsonl and README.md
    python scripts/make_dataset.py --out DIR  # writes the same three files into DIR

The output is a pure function of the constants below: one ``random.Random(SEED)`` (stdlib only) draws distinct
calendar dates and a surface form for each, so two runs write byte-identical files. The eval dates are
disjoint from the train dates. Every answer has exactly one right spelling, which makes exact match a fair
metric, and the instruction is short so that a whole example stays under ~48 tokens with SmolLM2's template.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from collections.abc import Callable
from pathlib import Path

SEED = 20240305
N_TRAIN = 2000
N_EVAL = 200
FIRST_YEAR, LAST_YEAR = 1900, 2099
INSTRUCTION = "Convert to YYYY-MM-DD: "
#: An explicit empty system message: without one, SmolLM2's chat template inserts its default system prompt
#: ("You are a helpful AI assistant named SmolLM, ..."), which costs 16 tokens in every example.
SYSTEM = ""
#: Share of inputs written in lower case ("friday, march 5, 2021").
LOWER_CASE_SHARE = 0.15
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "lorakit" / "data" / "dates"

MONTHS = "January February March April May June July August September October November December".split()
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def ordinal(n: int) -> str:
    """``1 -> "1st"``, ``2 -> "2nd"``, ``11 -> "11th"``, ``23 -> "23rd"``."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _month(d: dt.date) -> str:
    return MONTHS[d.month - 1]


def _mon(d: dt.date) -> str:
    return MONTHS[d.month - 1][:3]


def _weekday(d: dt.date) -> str:
    return WEEKDAYS[d.weekday()]


#: Surface forms: every one names the month in words, so none is ambiguous (no 03/05/2021).
FORMATS: dict[str, Callable[[dt.date], str]] = {
    "month_day_year": lambda d: f"{_month(d)} {d.day}, {d.year}",  # March 5, 2021
    "day_month_year": lambda d: f"{d.day} {_month(d)} {d.year}",  # 5 March 2021
    "ordinal_of": lambda d: f"{ordinal(d.day)} of {_month(d)} {d.year}",  # 5th of March 2021
    "the_ordinal_of": lambda d: f"the {ordinal(d.day)} of {_month(d)}, {d.year}",  # the 5th of March, 2021
    "month_ordinal": lambda d: f"{_month(d)} {ordinal(d.day)}, {d.year}",  # March 5th, 2021
    "abbrev_dot": lambda d: f"{_mon(d)}. {d.day}, {d.year}",  # Mar. 5, 2021
    "abbrev_bare": lambda d: f"{_mon(d)} {d.day} {d.year}",  # Mar 5 2021
    "weekday": lambda d: f"{_weekday(d)}, {_month(d)} {d.day}, {d.year}",  # Friday, March 5, 2021
    "weekday_short": lambda d: f"{_weekday(d)[:3]}, {d.day} {_mon(d)} {d.year}",  # Fri, 5 Mar 2021
    "year_first": lambda d: f"{d.year}, {_month(d)} {d.day}",  # 2021, March 5
    "dashed": lambda d: f"{d.day}-{_mon(d)}-{d.year}",  # 5-Mar-2021
}


def draw_dates(rng: random.Random, n: int) -> list[dt.date]:
    """``n`` distinct valid calendar dates between FIRST_YEAR and LAST_YEAR, in draw order."""
    first = dt.date(FIRST_YEAR, 1, 1).toordinal()
    last = dt.date(LAST_YEAR, 12, 31).toordinal()
    return [dt.date.fromordinal(o) for o in rng.sample(range(first, last + 1), n)]


def make_row(rng: random.Random, date: dt.date) -> dict:
    """One chat example: the date in a randomly chosen surface form, answered in ISO 8601."""
    name = rng.choice(sorted(FORMATS))
    text = FORMATS[name](date)
    if rng.random() < LOWER_CASE_SHARE:
        text = text.lower()
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": INSTRUCTION + text},
            {"role": "assistant", "content": date.isoformat()},
        ]
    }


def make_splits(seed: int = SEED, n_train: int = N_TRAIN, n_eval: int = N_EVAL) -> dict[str, list[dict]]:
    """``{"train": rows, "eval": rows}``; the two splits share no date."""
    rng = random.Random(seed)
    dates = draw_dates(rng, n_train + n_eval)
    rows = [make_row(rng, d) for d in dates]
    return {"train": rows[:n_train], "eval": rows[n_train:]}


def to_jsonl(rows: list[dict]) -> str:
    """One compact JSON object per line, ``\\n`` line ends, a final newline."""
    return "".join(json.dumps(row, ensure_ascii=False, separators=(", ", ": ")) + "\n" for row in rows)


def readme(splits: dict[str, list[dict]]) -> str:
    """The README.md written next to the data (counts and examples come from the data itself)."""
    examples = "\n".join(
        f"| {row['messages'][1]['content'][len(INSTRUCTION) :]} | {row['messages'][2]['content']} |"
        for row in splits["eval"][:6]
    )
    forms = "\n".join(f"- `{name}`: {fn(dt.date(2021, 3, 5))}" for name, fn in sorted(FORMATS.items()))
    return f"""# dates: English dates to ISO 8601

A format conversion with exactly one right answer. The user message is the instruction
`{INSTRUCTION.strip()}` followed by a date written in English; the assistant answers with that date in
ISO 8601 (`YYYY-MM-DD`) and nothing else. Exact match of the whole answer is the metric.

| split | file | rows |
|---|---|---|
| train | `train.jsonl` | {len(splits["train"])} |
| eval | `eval.jsonl` | {len(splits["eval"])} |

The eval dates are disjoint from the train dates. Dates are valid calendar dates from {FIRST_YEAR} to
{LAST_YEAR}; weekdays are the true ones.

## Format

JSON Lines, one chat example per line in the `messages` form that `lorakit train --data` accepts:

```json
{to_jsonl(splits["eval"][:1]).strip()}
```

Every row carries an empty system message on purpose: without one, SmolLM2's chat template inserts its
default system prompt, which would add 16 tokens to every example. Prompt the trained model the same way.

## Surface forms

Each date is written in one of these forms (shown for 5 March 2021), chosen at random; about
{round(LOWER_CASE_SHARE * 100)}% of inputs are lower-cased. None is ambiguous: the month is always a word.

{forms}

## Examples (first rows of the eval split)

| input | answer |
|---|---|
{examples}

## Regenerating

```
python scripts/make_dataset.py
```

The script uses only the standard library and a fixed seed ({SEED}); running it again writes
byte-identical files.
"""


def write(out: Path, seed: int = SEED) -> dict[str, Path]:
    """Write ``train.jsonl``, ``eval.jsonl`` and ``README.md`` into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    splits = make_splits(seed)
    contents = {f"{split}.jsonl": to_jsonl(rows) for split, rows in splits.items()}
    contents["README.md"] = readme(splits)
    paths = {}
    for name, text in contents.items():
        paths[name] = out / name
        paths[name].write_bytes(text.encode("utf-8"))
    return paths


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    for path in write(args.out).values():
        print(path)


if __name__ == "__main__":
    main()
