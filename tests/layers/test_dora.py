"""DoRA against its closed form (the materialised W + s·BA), for every base layer kind.

The reference builds V = W + s·BA in full and applies ``m ⊙ V / ‖V‖`` row-wise through the base layer's own
functional form; lorakit never builds V. Gradients are checked in float64 with ``gradcheck`` (the paper's
undetached form) and against autograd through the reference (the default, detached form).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_lora_layer import KINDS, functional, make_base
from torch import nn

from lorakit.errors import MergeError
from lorakit.layers import kind_for
from lorakit.tuners.lora.dora import DoraVariant, dora_norm
from lorakit.tuners.lora.fused import DoraLinearFunction
from lorakit.tuners.lora.layer import LoraLayer


def wrap_dora(base: nn.Module, r: int = 3, alpha: float = 5, grad_through_norm: bool = False, **kw) -> LoraLayer:
    layer = LoraLayer(base, kind_for(base))
    layer.add("default", r, alpha, init_lora_weights=False, use_dora=True, **kw)
    layer.lora_magnitude_vector["default"].grad_through_norm = grad_through_norm
    layer.set_active(["default"])
    for p in base.parameters():
        p.requires_grad_(False)
    return layer


def randomise_magnitude(layer: LoraLayer, adapter: str = "default") -> None:
    """m away from its initial value ‖V‖, so that the rescale is visible in outputs."""
    m = layer.lora_magnitude_vector[adapter].weight
    with torch.no_grad():
        m.mul_(1 + 0.3 * torch.rand(m.shape, generator=torch.Generator().manual_seed(7)))


def reference_weight(layer: LoraLayer, adapter: str = "default", detach: bool = True) -> torch.Tensor:
    """m ⊙ V / ‖V‖_c with V = W + s·BA materialised, in the base weight's layout."""
    kind, base = layer.kind, layer.base_layer
    v_matrix = kind.weight_matrix(base) + layer.scaling[adapter] * (
        kind.factors(layer, adapter)[1] @ kind.factors(layer, adapter)[0]
    )
    norm = torch.linalg.norm(v_matrix, dim=1)
    if detach:
        norm = norm.detach()
    m = layer.lora_magnitude_vector[adapter].weight.reshape(-1)
    return kind.to_weight_layout((m / norm)[:, None] * v_matrix, base)


@pytest.mark.parametrize("kind", KINDS)
def test_norm_formula_equals_materialised_norm(kind):
    base, _ = make_base(kind)
    layer = wrap_dora(base)
    kind_ = layer.kind
    a, b = kind_.factors(layer, "default")
    v = kind_.weight_matrix(base) + layer.scaling["default"] * b @ a
    torch.testing.assert_close(DoraVariant().norm(layer, "default"), torch.linalg.norm(v, dim=1))


@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(1, 24),
    k=st.integers(1, 24),
    r=st.integers(1, 8),
    s=st.floats(0.01, 8.0),
    seed=st.integers(0, 2**16),
)
def test_dora_norm_property(d, k, r, s, seed):
    g = torch.Generator().manual_seed(seed)
    m, a, b = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((d, k), (r, k), (d, r)))
    got = dora_norm((m * m).sum(1), a @ m.t(), a, b, s)
    torch.testing.assert_close(got, torch.linalg.norm(m + s * b @ a, dim=1))


@pytest.mark.parametrize("kind", KINDS)
def test_default_init_leaves_the_output_unchanged(kind):
    base, x = make_base(kind)
    expected = base(x)
    layer = LoraLayer(base, kind_for(base))
    layer.add("default", 4, 8, use_dora=True)  # B = 0 (A = 0 for embeddings): m = ‖W‖
    layer.set_active(["default"])
    m = layer.lora_magnitude_vector["default"].weight
    assert m.shape == layer.kind.channel_shape(layer)
    torch.testing.assert_close(m.reshape(-1), torch.linalg.norm(layer.kind.weight_matrix(base), dim=1))
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_output_matches_closed_form(kind, training):
    base, x = make_base(kind)
    layer = wrap_dora(base)
    randomise_magnitude(layer)
    layer.train(training)
    expected = functional(base, reference_weight(layer), x)
    torch.testing.assert_close(layer(x), expected)
    with torch.no_grad():  # the in-place inference path for nn.Linear
        torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("grad_through_norm", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_closed_form(kind, grad_through_norm):
    base, x = make_base(kind)
    layer = wrap_dora(base, grad_through_norm=grad_through_norm).train()
    randomise_magnitude(layer)
    params = [p for p in layer.parameters() if p.requires_grad]
    assert len(params) == 3  # A, B, m
    probe = torch.randn(base(x).shape, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad((layer(x) * probe).sum(), params)
    want = torch.autograd.grad(
        (functional(base, reference_weight(layer, detach=not grad_through_norm), x) * probe).sum(), params
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_detached_and_undetached_gradients_differ_only_in_a_and_b():
    base, x = make_base("linear")
    grads = {}
    for through in (False, True):
        torch.manual_seed(4)  # the same A and B both times
        layer = wrap_dora(base, grad_through_norm=through).train()
        randomise_magnitude(layer)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        m = layer.lora_magnitude_vector["default"].weight
        grads[through] = torch.autograd.grad(layer(x).square().sum(), (a, b, m))
    assert not torch.allclose(grads[False][0], grads[True][0])
    assert not torch.allclose(grads[False][1], grads[True][1])
    torch.testing.assert_close(grads[False][2], grads[True][2])  # m's gradient never involves ∂‖V‖


@pytest.mark.parametrize("kind", ["linear", "conv1d_hf", "conv2d"])
def test_gradcheck_float64_through_the_norm(kind):
    base, x = make_base(kind)
    base = base.double()
    layer = wrap_dora(base, grad_through_norm=True).double().train()
    x = x.double().requires_grad_(True)
    a, b = layer.kind.factor_params(layer, "default")
    m = layer.lora_magnitude_vector["default"].weight

    # gradcheck perturbs its inputs; they replace the layer's own parameters through functional_call
    params = {"lora_A.default.weight": a, "lora_B.default.weight": b, "lora_magnitude_vector.default.weight": m}

    def g(x_, a_, b_, m_):
        new = dict(zip(params, (a_, b_, m_)))
        return torch.func.functional_call(layer, new, (x_,))

    inputs = (x, a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_(), m.detach().clone())
    inputs[3].requires_grad_(True)
    assert torch.autograd.gradcheck(g, inputs)


def test_no_grad_leaves_no_graph_and_eval_caches_the_norm(monkeypatch):
    base, x = make_base("linear")
    layer = wrap_dora(base).eval()
    calls = []
    original = layer.kind.project_rows
    monkeypatch.setattr(layer.kind, "project_rows", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        first = layer(x)
        assert layer(x).equal(first)
    assert len(calls) == 1  # the second forward reused the cached norm
    with torch.no_grad():  # an in-place change of B (optimizer step, load_state_dict) is seen
        layer.lora_B["default"].weight.mul_(2)
    changed = layer(x)
    assert len(calls) == 2
    torch.testing.assert_close(changed, functional(base, reference_weight(layer), x))
    layer.train()
    layer(x)
    layer(x)
    assert len(calls) == 3  # training: once per weight state, so micro-batches between steps share it
    with torch.no_grad():
        layer.lora_A["default"].weight.add_(0.1)  # what an optimizer step does
    torch.testing.assert_close(layer(x), functional(base, reference_weight(layer), x))
    assert len(calls) == 4
    layer.lora_magnitude_vector["default"].grad_through_norm = True
    layer(x)
    layer(x)
    assert len(calls) == 6  # in the graph: never cached


@pytest.mark.parametrize("optimizer", ["adamw_fused", "adamw", "sgd"])
def test_every_optimizer_step_refreshes_the_cached_norm(optimizer):
    """Any torch optimizer made by the user (the HF Trainer's ``adamw_torch_fused`` too): each step's forward
    uses the norm of the weights after the step. torch's fused AdamW writes parameters without moving their
    version counters, so a cache keyed on versions alone kept the first step's norm for the whole run."""
    base, x = make_base("linear")
    layer = wrap_dora(base).train()
    trained = [p for p in layer.parameters() if p.requires_grad]
    make = {
        "adamw_fused": lambda: torch.optim.AdamW(trained, lr=1e-2, fused=True),
        "adamw": lambda: torch.optim.AdamW(trained, lr=1e-2),
        "sgd": lambda: torch.optim.SGD(trained, lr=1e-1),
    }
    opt = make[optimizer]()
    for _ in range(3):
        out = layer(x)
        torch.testing.assert_close(out, functional(base, reference_weight(layer), x))
        out.square().sum().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("kind", KINDS)
def test_merge_unmerge_round_trip(kind):
    base, x = make_base(kind)
    layer = wrap_dora(base).eval()
    randomise_magnitude(layer)
    weight = layer.kind.base_weight(base)
    original = weight.detach().clone()
    with torch.no_grad():
        unmerged = layer(x)
        expected_weight = reference_weight(layer)
        layer.merge()
        torch.testing.assert_close(weight, expected_weight)
        torch.testing.assert_close(layer(x), unmerged)
        torch.testing.assert_close(base(x), unmerged)  # the merged base alone is the adapted layer
        layer.unmerge()
    torch.testing.assert_close(weight, original)
    torch.testing.assert_close(layer(x), unmerged)


def test_sequential_adapters_merge_in_the_order_of_the_forward():
    base, x = make_base("linear")
    layer = wrap_dora(base)
    layer.add("plain", 2, 4, init_lora_weights=False)
    layer.add("second", 2, 3, init_lora_weights=False, use_dora=True)
    randomise_magnitude(layer, "second")
    layer.set_active(["plain", "default", "second"])
    layer.eval()
    original = base.weight.detach().clone()
    with torch.no_grad():
        unmerged = layer(x)
        for i, name in enumerate(["plain", "default", "second"]):
            layer.merge([name])  # part merged, part pending: still the same function
            torch.testing.assert_close(layer(x), unmerged, msg=f"after merging {i + 1}")
        layer.unmerge()
    torch.testing.assert_close(base.weight, original)


def test_safe_merge_refuses_a_zero_norm_row_and_leaves_the_weight():
    base = nn.Linear(4, 3)
    layer = wrap_dora(base)
    with torch.no_grad():
        base.weight[1].zero_()
        layer.lora_B["default"].weight[1].zero_()  # row 1 of V is 0: m / ‖V‖ is infinite
    before = base.weight.detach().clone()
    with pytest.raises(MergeError, match="NaN/Inf"):
        layer.merge(safe_merge=True)
    assert base.weight.equal(before) and not layer.merged


def test_dropout_follows_the_reference_implementation():
    """Training with dropout: h = base(x) + (m/‖V‖ − 1)·W·drop(x) + (m/‖V‖)·s·BA·drop(x) (DoRA's code, PEFT)."""
    base, x = make_base("linear")
    layer = wrap_dora(base, lora_dropout=0.5).train()
    randomise_magnitude(layer)
    torch.manual_seed(11)
    got = layer(x)
    torch.manual_seed(11)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    scale = layer.lora_magnitude_vector["default"].weight / DoraVariant().norm(layer, "default").detach()
    s = layer.scaling["default"]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = base(x) + (scale - 1) * (dropped @ base.weight.t()) + scale * s * (dropped @ a.t() @ b.t())
    torch.testing.assert_close(got, expected)


def test_fused_training_path_is_taken_and_equals_the_generic_one(monkeypatch):
    base, x = make_base("linear")
    x = x.requires_grad_(True)
    layer = wrap_dora(base).train()
    randomise_magnitude(layer)
    params = [x, *[p for p in layer.parameters() if p.requires_grad]]
    fast = layer(x)
    assert type(fast.grad_fn).__name__ == "DoraLinearFunctionBackward"
    fast_grads = torch.autograd.grad(fast.square().sum(), params)
    monkeypatch.setattr(DoraVariant, "fast_forward", lambda *a: None)
    slow = layer(x)
    slow_grads = torch.autograd.grad(slow.square().sum(), params)
    torch.testing.assert_close(fast, slow)
    for f, s in zip(fast_grads, slow_grads):
        torch.testing.assert_close(f, s)


def test_magnitude_is_per_output_feature_in_peft_shapes():
    shapes = {}
    for kind in KINDS:
        base, _ = make_base(kind)
        shapes[kind] = tuple(wrap_dora(base).lora_magnitude_vector["default"].weight.shape)
    assert shapes == {
        "linear": (7,),
        "conv1d_hf": (7,),
        "embedding": (6,),  # one per embedding dimension, as PEFT
        "conv1d": (1, 6, 1),
        "conv2d": (1, 5, 1, 1),
        "conv2d_1x1": (1, 5, 1, 1),
    }


def test_state_keys_and_delete():
    base, _ = make_base("linear")
    layer = wrap_dora(base)
    assert set(layer.adapter_state("default")) == {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"}
    assert layer.adapter_param_key("default", "lora_magnitude_vector") == "lora_magnitude_vector.default.weight"
    assert "lora_magnitude_vector.default.weight" in layer.state_dict()
    assert layer.use_dora == {"default": True}
    layer.delete("default")
    assert "lora_magnitude_vector" not in layer._modules and not layer.variant  # DoRA's state left with DoRA


def test_dora_kernel_gradcheck_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: DoraLinearFunction.apply(*t[:5], 0.7, t[5]), (x, w, bias, a, b, scale))
    no_bias = (x, w, None, a, b, scale)
    assert torch.autograd.gradcheck(lambda *t: DoraLinearFunction.apply(*t[:5], 0.7, t[5]), no_bias)
    y = DoraLinearFunction.apply(x, w, bias, a, b, 0.7, scale)
    torch.testing.assert_close(y, scale * (x @ (w + 0.7 * b @ a).T) + bias)


def _kernel_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"x": (2, 3, 5), "w": (4, 5), "bias": (4,), "a": (3, 5), "b": (4, 3), "scale": (4,)}
    return {k: torch.randn(*v, generator=g, dtype=torch.float64).requires_grad_() for k, v in shapes.items()}


def _reference_grads(t, probe):
    z = t["x"] @ (t["w"] + 0.7 * t["b"] @ t["a"]).T
    y = t["scale"] * z + t["bias"]
    return torch.autograd.grad((y * probe).sum(), list(t.values()))


@pytest.mark.parametrize("case", ["in_place_after", "zero_scale", "saved_tensor_hooks"])
def test_dora_kernel_recomputes_z_where_it_cannot_be_recovered(case):
    """The kernel recovers z = (y − b) / scale from its output; where that fails it must recompute z."""
    t = _kernel_inputs()
    if case == "zero_scale":
        with torch.no_grad():
            t["scale"][1] = 0.0
    probe = torch.randn(2, 3, 4, dtype=torch.float64)
    want = _reference_grads(t, probe)
    args = (t["x"], t["w"], t["bias"], t["a"], t["b"], 0.7, t["scale"])
    if case == "saved_tensor_hooks":
        with torch.autograd.graph.saved_tensors_hooks(lambda v: v.clone(), lambda v: v):
            y = DoraLinearFunction.apply(*args)
        out = y * probe
    else:
        y = DoraLinearFunction.apply(*args)
        if case == "in_place_after":
            out = y.clone() * probe  # the loss uses y as it was ...
            y.detach().add_(100.0)  # ... then y is changed in place (a detached alias shares its version counter)
        else:
            out = y * probe
    got = torch.autograd.grad(out.sum(), list(t.values()))
    for name, g, w in zip(t, got, want):
        torch.testing.assert_close(g, w, msg=name)


def test_no_out_by_in_temporary_in_a_training_step():
    """A 2048×2048 layer (16 MiB of weight): one DoRA forward + backward allocates far less than W once."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    base = nn.Linear(2048, 2048, bias=False)
    layer = wrap_dora(base, r=8).train()
    x = torch.randn(4, 2048, requires_grad=True)
    weight_bytes = base.weight.numel() * base.weight.element_size()

    def peak(fn) -> int:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation:
                events.append((node.start_time_ns, node.extra_fields.alloc_size))
            stack.extend(node.children)
        total = best = 0
        for _, size in sorted(events):
            total += size
            best = max(best, total)
        return best

    def step():
        layer(x).sum().backward()

    step()  # warm caches (‖W‖² is computed once while W is frozen)
    got = peak(step)
    assert got < weight_bytes / 8, f"a DoRA step allocated {got} bytes; W is {weight_bytes}"

    def materialising_step():  # the probe sees an out×in temporary when there is one
        v = base.weight + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        (x @ v.t() / torch.linalg.norm(v, dim=1).detach()).sum().backward()

    assert peak(materialising_step) >= weight_bytes


def test_cache_follows_dtype_changes_and_data_swaps():
    base, x = make_base("linear")
    layer = wrap_dora(base).eval()
    randomise_magnitude(layer)
    with torch.no_grad():
        layer(x)  # fills the caches
        layer.double()  # module.to() swaps every parameter's storage (no version bump)
        torch.testing.assert_close(layer(x.double()), functional(base, reference_weight(layer), x.double()))
        base.weight.data = base.weight.data * 2  # `.data =` swaps the storage too
        torch.testing.assert_close(layer(x.double()), functional(base, reference_weight(layer), x.double()))


def test_half_precision_base_with_float32_adapter():
    base, x = make_base("linear")
    base = base.to(torch.bfloat16)
    layer = LoraLayer(base, kind_for(base))
    layer.add("default", 3, 5, init_lora_weights=False, use_dora=True, dtype=torch.float32)
    layer.set_active(["default"])
    randomise_magnitude(layer)
    x = x.to(torch.bfloat16)
    reference = functional(copy.deepcopy(base).float(), reference_weight(layer).float(), x.float())  # in fp32
    got = layer(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), reference, rtol=3e-2, atol=3e-2)
