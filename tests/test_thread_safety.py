"""Calls from several threads at once: a mixed-adapter batch (``adapter_names``) only ever sees its own routing.

Each thread's output is compared with the same call run alone, before any thread started. The threads meet at a
barrier before every round, so their calls overlap.
"""

from __future__ import annotations

import threading

import torch

from conftest import tiny_llama
from lorakit import LoraConfig, get_peft_model

RANDOM = dict(init_lora_weights=False)
ADAPTERS = {  # different ranks, targets and variants (plain LoRA and DoRA)
    "small": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], **RANDOM),
    "wide": LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], **RANDOM),
    "dora": LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "up_proj"], use_dora=True, **RANDOM),
}
ROUNDS = 12


def model_with_adapters(seed: int = 0):
    model = get_peft_model(tiny_llama(seed), ADAPTERS["small"], adapter_name="small")
    for name in ("wide", "dora"):
        model.add_adapter(name, ADAPTERS[name])
    with torch.no_grad():  # DoRA magnitudes off their initial value, where the rescale is the identity
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + torch.rand(p.shape))
    return model.eval()


def run_in_threads(jobs, rounds=ROUNDS):
    """Run each ``job(round)`` in its own thread, all threads starting every round together; re-raise the first
    error (an assertion included) in the calling thread."""
    barrier = threading.Barrier(len(jobs))
    errors = []

    def loop(job):
        try:
            for i in range(rounds):
                barrier.wait(timeout=60)
                job(i)
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=loop, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real or errors:
        raise (real or errors)[0]


def mixed_job(model, ids, names, expected, label):
    def job(i):
        with torch.no_grad():
            got = model(input_ids=ids, adapter_names=names).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{label}, round {i}: {m}")

    return job


def test_mixed_batches_from_several_threads_each_get_their_own_rows():
    model = model_with_adapters()
    torch.manual_seed(0)
    orders = [  # LoRA, DoRA and base rows in different orders and batch sizes (grouped and masked plans)
        ["wide", "small", "__base__", "dora", "wide", "small"],
        ["dora", "dora", "wide", "__base__", "small", "small"],
        ["__base__", "small", "dora", "wide"],
        ["wide"] * 6 + ["dora"],
        ["small", "__base__", "small", "dora", "dora", "wide", "wide", "__base__"],
    ]
    inputs = [torch.randint(0, 96, (len(names), 9)) for names in orders]
    with torch.no_grad():
        expected = [model(input_ids=ids, adapter_names=names).logits for ids, names in zip(inputs, orders)]
    jobs = [
        mixed_job(model, ids, names, exp, f"thread {k}")
        for k, (ids, names, exp) in enumerate(zip(inputs, orders, expected))
    ]
    run_in_threads(jobs)


def test_generate_from_several_threads_with_different_rows():
    model = model_with_adapters()
    torch.manual_seed(1)
    orders = [
        ["small", "dora", "__base__", "wide"],
        ["wide", "wide", "dora", "small"],
        ["dora", "__base__", "small", "small"],
    ]
    inputs = [torch.randint(3, 96, (4, 6)) for _ in orders]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = [model.generate(input_ids=ids, adapter_names=names, **kw) for ids, names in zip(inputs, orders)]

    def job_for(ids, names, exp, label):
        def job(i):
            with torch.no_grad():
                got = model.generate(input_ids=ids, adapter_names=names, **kw)
            assert torch.equal(got, exp), f"{label}, round {i}: {got.tolist()} != {exp.tolist()}"

        return job

    run_in_threads([job_for(*case, f"thread {k}") for k, case in enumerate(zip(inputs, orders, expected))], rounds=4)


def test_set_adapter_in_one_thread_while_another_mixes_adapters():
    """``set_adapter`` is model-wide, but a batch with ``adapter_names`` does not read it: the mixing thread gets
    its rows, and the one thread that switches gets the adapter it chose."""
    model = model_with_adapters()
    torch.manual_seed(2)
    names = ["dora", "small", "__base__", "wide", "wide"]
    mixed_ids, plain_ids = torch.randint(0, 96, (5, 8)), torch.randint(0, 96, (5, 8))
    with torch.no_grad():
        expected_mixed = model(input_ids=mixed_ids, adapter_names=names).logits
        expected_plain = {}
        for adapter in ADAPTERS:
            model.set_adapter(adapter)
            expected_plain[adapter] = model(input_ids=plain_ids).logits
    order = list(ADAPTERS)

    def plain(i):
        adapter = order[i % len(order)]
        model.set_adapter(adapter)
        with torch.no_grad():
            got = model(input_ids=plain_ids).logits
        torch.testing.assert_close(got, expected_plain[adapter], rtol=1e-5, atol=1e-6, msg=f"set_adapter({adapter!r})")

    run_in_threads([plain, mixed_job(model, mixed_ids, names, expected_mixed, "mixed"), another_mixing_job(model)])


def another_mixing_job(model):
    """A third thread that only mixes, so that mixing threads also overlap one another."""
    torch.manual_seed(3)
    names = ["small", "small", "dora", "__base__"]
    ids = torch.randint(0, 96, (4, 7))
    with torch.no_grad():
        expected = model(input_ids=ids, adapter_names=names).logits
    return mixed_job(model, ids, names, expected, "second mixed")


def test_a_routing_applies_only_to_the_model_that_set_it():
    """One model called inside another's mixed batch runs its own active adapter (or its own rows)."""
    outer, inner = model_with_adapters(seed=0), model_with_adapters(seed=5)
    inner.set_adapter("wide")
    torch.manual_seed(4)
    names, inner_names = ["dora", "small", "__base__"], ["small", "__base__", "dora"]
    ids = torch.randint(0, 96, (3, 6))
    with torch.no_grad():
        expected_outer = outer(input_ids=ids, adapter_names=names).logits
        expected_inner = inner(input_ids=ids).logits
        expected_inner_mixed = inner(input_ids=ids, adapter_names=inner_names).logits
        with outer.base_model.rows_routed(names, batch=3):
            torch.testing.assert_close(inner(input_ids=ids).logits, expected_inner, rtol=0, atol=0)
            torch.testing.assert_close(
                inner(input_ids=ids, adapter_names=inner_names).logits, expected_inner_mixed, rtol=0, atol=0
            )
            torch.testing.assert_close(outer.base_model(input_ids=ids).logits, expected_outer, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(inner(input_ids=ids).logits, expected_inner, rtol=0, atol=0)
