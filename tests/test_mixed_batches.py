"""Batches that mix adapters (``adapter_names``): each row equals that row run alone with its adapter."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from lorakit import LoraConfig, get_peft_model
from lorakit.errors import AdapterNotFoundError, ConfigError, MergeError

RANDOM = dict(init_lora_weights=False)
ADAPTERS = {  # different ranks, targets and variants; "small" lacks o_proj, "dora" lacks q_proj
    "small": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], **RANDOM),
    "wide": LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], **RANDOM),
    "dora": LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "up_proj"], use_dora=True, **RANDOM),
}


def model_with_adapters(factory=tiny_llama, adapters=ADAPTERS):
    names = list(adapters)
    model = get_peft_model(factory(), adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, adapters[name])
    with torch.no_grad():  # DoRA magnitudes off their initial value, where the rescale is the identity
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + torch.rand(p.shape))
    return model.eval()


def alone(model, name, ids, **kw):
    if name == "__base__":
        with model.disable_adapter():
            return model(input_ids=ids, **kw).logits
    model.set_adapter(name)
    return model(input_ids=ids, **kw).logits


def test_every_row_equals_running_it_alone_with_its_adapter():
    model = model_with_adapters()
    torch.manual_seed(0)
    ids = torch.randint(0, 96, (6, 10))
    names = ["wide", "small", "__base__", "dora", "wide", "small"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for row, name in enumerate(names):
            torch.testing.assert_close(
                mixed[row : row + 1], alone(model, name, ids[row : row + 1]), rtol=1e-5, atol=1e-5
            )
    assert all(layer.row_adapters is None for layer in model.modules() if hasattr(layer, "row_adapters"))


def test_conv1d_with_bias_and_dora_rows():
    adapters = {
        "a": LoraConfig(r=4, target_modules=["c_attn", "c_proj"], init_lora_weights=False),
        "d": LoraConfig(r=2, target_modules=["c_attn", "c_fc"], use_dora=True, init_lora_weights=False),
    }
    model = model_with_adapters(tiny_gpt2, adapters)
    ids = torch.randint(0, 96, (3, 7))
    names = ["d", "a", "__base__"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for row, name in enumerate(names):
            torch.testing.assert_close(
                mixed[row : row + 1], alone(model, name, ids[row : row + 1]), rtol=1e-5, atol=1e-5
            )


@pytest.mark.parametrize("beams", [1, 2])
def test_generate_with_kv_cache_equals_each_row_alone(beams):
    model = model_with_adapters()
    torch.manual_seed(1)
    ids = torch.randint(3, 96, (4, 6))
    names = ["small", "dora", "__base__", "wide"]
    kw = dict(max_new_tokens=8, do_sample=False, num_beams=beams, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=names, **kw)
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    expected = model.generate(input_ids=ids[row : row + 1], **kw)
            else:
                model.set_adapter(name)
                expected = model.generate(input_ids=ids[row : row + 1], **kw)
            assert torch.equal(mixed[row : row + 1, : expected.shape[1]], expected), (row, name)


def test_bad_adapter_names_are_refused_and_leave_the_model_alone():
    model = model_with_adapters()
    ids = torch.randint(0, 96, (2, 5))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with pytest.raises(AdapterNotFoundError, match="adapter_names holds 'wdie'.*did you mean 'wide'"):
        model(input_ids=ids, adapter_names=["small", "wdie"])
    with pytest.raises(ConfigError, match="adapter_names has 3 entries but the batch has 2 rows"):
        model(input_ids=ids, adapter_names=["small", "wide", "dora"])
    with pytest.raises(ConfigError, match="must be a list of adapter names"):
        model(input_ids=ids, adapter_names="small")
    model.train()
    with pytest.raises(ConfigError, match="runs in eval mode"):
        model(input_ids=ids, adapter_names=["small", "wide"])
    model.eval()
    model.set_adapter("small")
    model.merge_adapter()
    with pytest.raises(MergeError, match="unmerge them before mixing"):
        model(input_ids=ids, adapter_names=["small", "wide"])
    model.unmerge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)
    assert all(layer.row_adapters is None for layer in model.modules() if hasattr(layer, "row_adapters"))


def test_the_concatenated_factors_follow_weight_changes():
    model = model_with_adapters()
    ids = torch.randint(0, 96, (2, 5))
    names = ["small", "wide"]
    with torch.no_grad():
        model(input_ids=ids, adapter_names=names)
        for n, p in model.named_parameters():
            if "lora_B.wide" in n:
                p.mul_(2.0)
        mixed = model(input_ids=ids, adapter_names=names).logits
        torch.testing.assert_close(mixed[1:], alone(model, "wide", ids[1:]), rtol=1e-5, atol=1e-5)


def _packs(layer):
    """The distinct packs a layer keeps (several compositions may run on one)."""
    return list({id(e.pack): e.pack for e in layer.__dict__.get("_mixed_packs", {}).values()}.values())


def _pack(layer):
    (pack,) = _packs(layer)
    return pack


def _plans_used(model):
    from lorakit.tuners.lora.layer import LoraLayer

    plans = set()
    for layer in model.modules():
        for pack in _packs(layer) if isinstance(layer, LoraLayer) else ():
            plans.update("grouped" if p.rows.grouped else "masked" for p in pack._plans.values())
    return plans


@pytest.mark.parametrize(
    ("names", "plan"),
    [
        (["wide", "small", "dora", "wide", "small", "dora"], "grouped"),  # balanced: each row its adapter only
        (["wide", "wide", "small", "__base__", "wide", "dora", "small"], "grouped"),  # padded groups, base rows
        (["wide"] * 6 + ["small"], "masked"),  # one big group: padding the others would cost more than masking
        (["wide", "small", "dora", "wide", "small", "dora"], "masked real"),  # 6 rows: gathering costs more
    ],
)
def test_both_plans_give_each_row_its_own_adapter(names, plan, monkeypatch):
    from lorakit.tuners.lora import mixed as mixed_module

    if plan != "masked real":  # the plans' arithmetic alone (the tiny ranks never pay for gathering)
        monkeypatch.setattr(mixed_module, "GROUPED_OVERHEAD", 0)
    plan = plan.split()[0]
    model = model_with_adapters()
    torch.manual_seed(2)
    ids = torch.randint(0, 96, (len(names), 9))
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        assert plan in _plans_used(model)
        for row, name in enumerate(names):
            torch.testing.assert_close(
                mixed[row : row + 1], alone(model, name, ids[row : row + 1]), rtol=1e-5, atol=1e-5
            )


def test_mixed_rows_keep_gradients_flowing_to_the_input_in_eval_mode():
    """Grouped rows are added in place onto the base output; autograd still sees every path."""
    model = model_with_adapters()
    names = ["wide", "small", "dora", "wide"]
    embeds = model.get_input_embeddings()(torch.randint(0, 96, (4, 5))).detach().requires_grad_(True)
    mixed = model(inputs_embeds=embeds, adapter_names=names).logits
    mixed[1].sum().backward()
    grad = embeds.grad.clone()
    assert grad[1].abs().sum() > 0 and grad[[0, 2, 3]].abs().sum() == 0  # rows do not leak into each other
    embeds.grad = None
    alone(model, "small", None, inputs_embeds=embeds[1:2])[0].sum().backward()
    torch.testing.assert_close(grad[1:2], embeds.grad[1:2], rtol=1e-4, atol=1e-6)


def test_rows_in_a_new_order_keep_each_layers_pack_and_share_one_row_plan_per_layout():
    """A server's batch changes order as rows leave: the layers keep their packs (no stacks rebuilt), and where the
    rows go is worked out once per call for all layers of one layout of adapters, not once per layer."""
    from lorakit.layers.routing import RowRouting
    from lorakit.tuners.lora.layer import LoraLayer

    same = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], **RANDOM)
    model = model_with_adapters(adapters={"a": LoraConfig(**same), "b": LoraConfig(**same)})
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    ids = torch.randint(0, 96, (4, 5))
    made = []
    init = RowRouting.__init__

    def spy(self, *args):
        init(self, *args)
        made.append(self)

    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(RowRouting, "__init__", spy)
        first = model(input_ids=ids, adapter_names=["a", "b", "a", "b"]).logits
        packs = [_pack(layer) for layer in layers]
        flipped = model(input_ids=ids[[1, 0, 3, 2]], adapter_names=["b", "a", "b", "a"]).logits
    assert [_pack(layer) for layer in layers] == packs  # the same objects
    assert all(len(pack._plans) == 2 for pack in packs)
    assert len(made) == 2 and all(len(routing.shared) == 1 for routing in made)  # one row plan for all layers
    plans = {id(plan.rows) for pack in packs for plan in pack._plans.values()}
    assert len(plans) == 2  # two orders of rows, each shared by every layer
    torch.testing.assert_close(flipped, first[[1, 0, 3, 2]], rtol=1e-5, atol=1e-5)


def test_a_layer_keeps_the_packs_of_several_compositions():
    """A server alternates prefills that name a few adapters with decode steps that name them all: neither call
    rebuilds the other's pack (stacks, concatenations, plans). Two of three adapters (widths 8 + 2 of 14) run on the
    pack of all three, which later calls of any two or three reuse; one alone (2 of 14) gets a pack of its own."""
    from lorakit.tuners.lora.layer import LoraLayer

    model = model_with_adapters()
    ids = torch.randint(0, 96, (3, 4))
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer) and set(m.r) == {"wide", "small", "dora"})
    both, everything = tuple(a for a in layer.r if a in ("wide", "small")), tuple(layer.r)
    with torch.no_grad():
        model(input_ids=ids, adapter_names=["wide", "small", "wide"])
        pack = layer.__dict__["_mixed_packs"][both].pack
        model(input_ids=ids[:1], adapter_names=["small"])
        model(input_ids=ids, adapter_names=["wide", "small", "wide"])
        model(input_ids=ids, adapter_names=["dora", "small", "wide"])
    packs = layer.__dict__["_mixed_packs"]
    assert pack.adapters == everything and packs[both].pack is pack and packs[everything].pack is pack
    assert set(packs) == {both, everything, ("small",)} and len(_packs(layer)) == 2


EQUAL = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **RANDOM)


@pytest.mark.parametrize("grouped", [False, True])
def test_fewer_adapters_run_on_the_pack_of_more_without_building_one(grouped, monkeypatch):
    """A decode step naming some of the adapters of an earlier step runs on that step's pack (the others' blocks
    masked, or their groups empty), builds nothing, and each row still equals its adapter alone."""
    from lorakit.tuners.lora import mixed as mixed_module

    if grouped:
        monkeypatch.setattr(mixed_module, "GROUPED_OVERHEAD", -(10**6))
    model = model_with_adapters(adapters={name: LoraConfig(**EQUAL) for name in "abcd"})
    built = []
    init = mixed_module._Pack.__init__
    monkeypatch.setattr(mixed_module._Pack, "__init__", lambda self, *a: (built.append(a[1]), init(self, *a))[1])
    torch.manual_seed(3)
    ids = torch.randint(0, 96, (4, 6))
    with torch.no_grad():
        model(input_ids=ids, adapter_names=["a", "b", "c", "d"])
        count = len(built)
        for names in (["c", "a", "b", "a"], ["b", "a", "b", "a"], ["d", "__base__", "b", "d"]):
            mixed = model(input_ids=ids, adapter_names=names).logits
            for row, name in enumerate(names):
                torch.testing.assert_close(mixed[row : row + 1], alone(model, name, ids[row : row + 1]))
        assert len(built) == count  # 3 and 2 of 4 equal ranks: within COVER_SLACK of the pack of all four
        model(input_ids=ids, adapter_names=["c"] * 4)
        assert len(built) == 2 * count and set(built[-1]) == {"c"}  # 1 of 4 is too narrow: a pack of its own
        assert _plans_used(model) == {"grouped" if grouped else "masked"}


def test_a_wide_pack_is_rebuilt_when_an_adapter_it_holds_changes():
    model = model_with_adapters(adapters={name: LoraConfig(**EQUAL) for name in "abc"})
    ids = torch.randint(0, 96, (3, 5))
    with torch.no_grad():
        model(input_ids=ids, adapter_names=["a", "b", "c"])
        model(input_ids=ids, adapter_names=["a", "b", "a"])
        for n, p in model.named_parameters():
            if "lora_B.b" in n:
                p.add_(0.5)
        mixed = model(input_ids=ids, adapter_names=["a", "b", "a"]).logits
        torch.testing.assert_close(mixed[1:2], alone(model, "b", ids[1:2]))


def test_a_layer_keeps_its_packs_within_a_budget_of_its_adapters_width(monkeypatch):
    """Every composition of 6 adapters, one after the other: the packs a layer keeps stay within PACK_BUDGET times
    the width of all its adapters, and it remembers at most MAX_COMPOSITIONS compositions."""
    import itertools

    from lorakit.tuners.lora import mixed as mixed_module
    from lorakit.tuners.lora.layer import LoraLayer

    monkeypatch.setattr(mixed_module, "MAX_COMPOSITIONS", 12)
    model = model_with_adapters(adapters={name: LoraConfig(**EQUAL) for name in "abcdef"})
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    ids = torch.randint(0, 96, (3, 2))
    with torch.no_grad():
        for size in (1, 2, 3):
            for names in itertools.combinations("abcdef", size):
                model(input_ids=ids, adapter_names=list(itertools.islice(itertools.cycle(names), 3)))
                for layer in layers:
                    kept = layer.__dict__["_mixed_packs"]
                    assert sum(p.width for p in _packs(layer)) <= mixed_module.PACK_BUDGET * 24
                    assert len(kept) <= 12 and tuple(a for a in layer.r if a in names) in kept


def test_an_adapter_the_call_does_not_name_cannot_fail_it(monkeypatch):
    """Packing every adapter of a layer is a shortcut: where one the call does not name cannot be packed, the call
    packs those it names."""
    from lorakit.tuners.lora import mixed as mixed_module

    model = model_with_adapters(adapters={name: LoraConfig(**EQUAL) for name in "abc"})
    init = mixed_module._Pack.__init__

    def refuse_c(self, layer, adapters):
        if "c" in adapters:
            raise RuntimeError("c cannot be packed")
        init(self, layer, adapters)

    monkeypatch.setattr(mixed_module._Pack, "__init__", refuse_c)
    ids = torch.randint(0, 96, (2, 5))
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["a", "b"]).logits
        torch.testing.assert_close(mixed[1:], alone(model, "b", ids[1:]))


def test_a_pack_that_holds_a_deleted_adapter_is_not_used():
    model = model_with_adapters(adapters={name: LoraConfig(**EQUAL) for name in "abc"})
    ids = torch.randint(0, 96, (3, 5))
    with torch.no_grad():
        model(input_ids=ids, adapter_names=["a", "b", "c"])
        model.delete_adapter("c")
        mixed = model(input_ids=ids, adapter_names=["a", "b", "a"]).logits
        torch.testing.assert_close(mixed[1:2], alone(model, "b", ids[1:2]))


def test_a_kept_routing_skips_its_layers_checks_and_is_still_validated(monkeypatch):
    """``rows_routed`` takes a RowRouting kept from an earlier block: its second call goes straight to the GEMMs
    (no layer prepares again), gives the same rows, and its names are still checked."""
    from lorakit.layers.routing import RowRouting
    from lorakit.tuners.lora import mixed as mixed_module

    model = model_with_adapters()
    ids = torch.randint(0, 96, (3, 6))
    calls = []
    prepare = mixed_module._prepare
    monkeypatch.setattr(mixed_module, "_prepare", lambda *a: (calls.append(a[0]), prepare(*a))[1])
    routing = RowRouting(["wide", "small", "__base__"])
    with torch.no_grad():
        with model.base_model.rows_routed(routing):
            first = model(input_ids=ids).logits
        prepared = len(calls)
        with model.base_model.rows_routed(routing):
            second = model(input_ids=ids).logits
        torch.testing.assert_close(second, first)
        torch.testing.assert_close(first[:1], alone(model, "wide", ids[:1]))
    assert prepared > 0 and len(calls) == prepared
    with pytest.raises(AdapterNotFoundError, match="nope"), model.base_model.rows_routed(RowRouting(["nope"])):
        pass
    with pytest.raises(ConfigError, match="3 entries but the batch has 2"), model.base_model.rows_routed(routing, 2):
        pass
