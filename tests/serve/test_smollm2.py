"""The real default model behind the server: concurrent chat requests on two adapters and the base, each greedy
answer equal to ``lorakit generate``'s (slow: SmolLM2-135M, loaded twice)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from serve.conftest import running_server

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Convert to ISO 8601 (YYYY-MM-DD): March 5, 2021",
    "Write one sentence about the sea.",
    "List three colours.",
    "What is 12 times 12?",
    "Say hello in Spanish.",
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory, one_thread):
    from lorakit import LoraConfig, get_peft_model
    from lorakit.errors import LorakitError
    from lorakit.hub import load_model, resolve_model

    try:
        folder = resolve_model(None)
    except LorakitError as exc:
        pytest.skip(f"the default model is not available: {exc}")
    root = tmp_path_factory.mktemp("smollm2")
    adapters = {}
    for seed, name in enumerate(("terse", "chatty"), 1):
        model, _ = load_model(folder)
        torch.manual_seed(seed)
        config = LoraConfig(r=8, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(root / name)
        adapters[name] = str(root / name)
    return folder, adapters


def test_concurrent_chat_on_smollm2_equals_lorakit_generate(smollm2):
    from argparse import Namespace

    from openai import OpenAI

    from lorakit.cli.generate import complete, load_for_inference

    folder, adapters = smollm2
    models = ["terse", "chatty", "SmolLM2", "chatty", "terse", "SmolLM2"]
    with running_server(folder, base_name="SmolLM2", adapters=adapters, max_batch=8) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)

        def ask(job):
            model, question = job
            messages = [{"role": "user", "content": question}]
            r = client.chat.completions.create(model=model, messages=messages, max_tokens=40, temperature=0)
            return r.choices[0].message.content

        with ThreadPoolExecutor(len(models)) as pool:
            answers = list(pool.map(ask, zip(models, QUESTIONS)))
    reference, tokenizer = load_for_inference(str(folder), adapters, "cpu")
    args = Namespace(temperature=0.0, top_p=1.0, max_new_tokens=40)
    for model, question, answer in zip(models, QUESTIONS, answers):
        messages = [{"role": "user", "content": question}]
        if model == "SmolLM2":
            with reference.disable_adapter():
                expected = complete(reference, tokenizer, messages, args)
        else:
            reference.set_adapter(model)
            expected = complete(reference, tokenizer, messages, args)
        assert answer.strip() == expected, (model, question)
