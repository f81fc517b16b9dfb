"""lorakit.training.evaluate: strict exact match, the lenient figure, batched greedy generation."""

from __future__ import annotations

import pytest
import torch

from lorakit.training.data import eval_pairs
from lorakit.training.evaluate import EvalResult, exact_match, generate_batch, normalize_answer

ROWS = [
    {"prompt": "Convert to YYYY-MM-DD: March 5, 2021", "completion": "2021-03-05"},
    {"prompt": "Convert to YYYY-MM-DD: 5 March 2021", "completion": "2021-03-05"},
    {"prompt": "Say hello.", "completion": "hello"},
    {"prompt": "Capital of France?", "completion": "Paris"},
]


def test_normalize_answer_strips_whitespace_only():
    assert normalize_answer("  2021-03-05\n") == "2021-03-05"
    assert normalize_answer("Paris.") == "Paris."
    assert normalize_answer("PARIS") != normalize_answer("Paris")


def test_exact_match_counts_with_a_fake_generator():
    pairs = eval_pairs(ROWS)
    outputs = ["2021-03-05 ", "The date is 2021-03-05.", "Hello", "Paris"]
    result = exact_match(None, None, pairs, generate=lambda prompts: outputs[: len(prompts)])
    assert isinstance(result, EvalResult)
    assert (result.correct, result.total, result.accuracy) == (2, 4, 0.5)
    assert (result.contains_correct, result.contains) == (3, 0.75)
    assert [s["correct"] for s in result.samples] == [True, False, False, True]
    assert [s["contains"] for s in result.samples] == [True, True, False, True]
    assert result.samples[2] == {
        "prompt": "Say hello.",
        "expected": "hello",
        "output": "Hello",
        "correct": False,
        "contains": False,
        "stopped": True,
    }
    assert result.summary() == "exact match 2/4 = 50.0% (answer anywhere in output: 75.0%)"
    limited = exact_match(None, None, pairs, limit=2, generate=lambda prompts: outputs[: len(prompts)])
    assert (limited.correct, limited.total) == (1, 2)
    empty = exact_match(None, None, [], generate=lambda prompts: [])
    assert (empty.accuracy, empty.total) == (0.0, 0)


class ScriptedModel(torch.nn.Module):
    """Answers each prompt with scripted token ids, the way ``generate`` returns them (prompt + new + padding)."""

    def __init__(self, answers: list[list[int]], pad: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.answers, self.pad, self.calls = answers, pad, []

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, eos_token_id, pad_token_id):
        self.calls.append({"mask": attention_mask.clone(), "training": self.training, "eos": eos_token_id})
        start = sum(len(c["mask"]) for c in self.calls[:-1])
        rows = [a[:max_new_tokens] for a in self.answers[start : start + len(input_ids)]]
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def test_generate_batch_left_pads_decodes_new_tokens_and_stops(tokenizer):
    eos = tokenizer.eos_token_id
    enc = [
        tokenizer("2021-03-05", add_special_tokens=False).input_ids,
        tokenizer("hello", add_special_tokens=False).input_ids,
    ]
    answers = [enc[0] + [eos] + enc[1], enc[1] + [eos], enc[1], enc[0]]  # text after the first stop is cut
    model = ScriptedModel(answers, pad=eos).train()
    prompts = [p for p, _ in eval_pairs(ROWS)]
    tokenizer.padding_side = "right"
    outputs = generate_batch(model, tokenizer, prompts, max_new_tokens=32, batch_size=3)
    assert outputs == ["2021-03-05", "hello", "hello", "2021-03-05"]
    assert [len(c["mask"]) for c in model.calls] == [3, 1]
    first = model.calls[0]["mask"]
    assert (first[:, -1] == 1).all() and (first[:, 0] == 0).any()  # left padding: every prompt ends at the edge
    assert not model.calls[0]["training"] and eos in model.calls[0]["eos"]
    assert model.training and tokenizer.padding_side == "right"  # both restored


def test_exact_match_runs_on_a_tiny_llama(tokenizer, tiny_model):
    pairs = eval_pairs(ROWS * 2)
    result = exact_match(tiny_model, tokenizer, pairs, max_new_tokens=4, batch_size=3)
    assert result.total == 8 and len(result.samples) == 8
    assert 0 <= result.correct <= result.contains_correct <= result.total
    assert result.accuracy == pytest.approx(result.correct / 8)
    assert all(isinstance(s["output"], str) for s in result.samples)
    assert not tiny_model.training and tokenizer.padding_side == "right"
    # Batching does not change greedy answers (left padding is masked; small float noise aside).
    one_by_one = exact_match(tiny_model, tokenizer, pairs, max_new_tokens=4, batch_size=1)
    assert [s["output"] for s in one_by_one.samples] == [s["output"] for s in result.samples]


def test_generate_batch_rejects_bad_sizes(tokenizer, tiny_model):
    with pytest.raises(ValueError, match="must be positive"):
        generate_batch(tiny_model, tokenizer, [[{"role": "user", "content": "hi"}]], max_new_tokens=0, batch_size=1)


def test_exact_match_through_a_lorakit_peft_model(tokenizer, tiny_model):
    from lorakit import LoraConfig, TaskType, get_peft_model

    pairs = eval_pairs(ROWS)
    plain = exact_match(tiny_model, tokenizer, pairs, max_new_tokens=4, batch_size=4)
    cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(tiny_model, cfg).train()
    wrapped = exact_match(peft_model, tokenizer, pairs, max_new_tokens=4, batch_size=4)
    assert peft_model.training  # the mode it had before is restored
    # A fresh adapter is a no-op (B = 0), so the answers are the base model's.
    assert [s["output"] for s in wrapped.samples] == [s["output"] for s in plain.samples]


def test_an_answer_cut_off_by_the_budget_is_wrong(tokenizer):
    eos = tokenizer.eos_token_id
    date = tokenizer("2021-03-05", add_special_tokens=False).input_ids
    other = tokenizer("2021-03-06", add_special_tokens=False).input_ids
    more = tokenizer(" hello" * 6, add_special_tokens=False).input_ids
    pairs = eval_pairs(ROWS[:1] * 3)
    # generate() runs until every row has stopped or the budget is spent: an unfinished row fills the budget.
    model = ScriptedModel([date + [eos], date + more, other + [eos]], pad=eos)
    result = exact_match(model, tokenizer, pairs, max_new_tokens=len(date + more), batch_size=3)
    assert [s["output"] for s in result.samples] == ["2021-03-05", "2021-03-05" + " hello" * 6, "2021-03-06"]
    assert [s["stopped"] for s in result.samples] == [True, False, True]
    assert [s["correct"] for s in result.samples] == [True, False, False]
    assert [s["contains"] for s in result.samples] == [True, True, False]
    # A budget that ends right after the date does not make a rambling answer right.
    model = ScriptedModel([date + more], pad=eos)
    result = exact_match(model, tokenizer, pairs[:1], max_new_tokens=len(date), batch_size=1)
    assert result.samples[0]["output"] == "2021-03-05" and not result.samples[0]["stopped"]
    assert (result.correct, result.contains_correct) == (0, 1)


def test_a_tokenizer_without_pad_token_gets_one_for_the_call_only(plain_tokenizer, tiny_model):
    plain_tokenizer.pad_token = None
    outputs = generate_batch(tiny_model, plain_tokenizer, [p for p, _ in eval_pairs(ROWS)], 3, batch_size=4)
    assert len(outputs) == 4 and plain_tokenizer.pad_token is None
