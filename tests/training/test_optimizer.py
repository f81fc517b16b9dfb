"""``lorakit train``'s optimizers: torch's AdamW takes its fused kernel where torch allows it."""

from __future__ import annotations

import torch

from lorakit.training.trainer import build_optimizer


def test_adamw_is_fused_on_cpu_and_steps_like_the_default():
    gen = torch.Generator().manual_seed(0)
    ours = [
        torch.nn.Parameter(torch.randn(8, 16, generator=gen)),
        torch.nn.Parameter(torch.randn(16, 8, generator=gen)),
    ]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    opt = build_optimizer("adamw", ours, lr=1e-2, weight_decay=0.01)
    ref = torch.optim.AdamW(plain, lr=1e-2, weight_decay=0.01)
    assert opt.defaults["fused"] is True and not ref.defaults.get("fused")
    for _ in range(3):
        for a, b in zip(ours, plain):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for a, b, s in zip(ours, plain, start):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert (a - s).abs().min() > 0  # every entry moved: the fused kernel really stepped


def test_adamw_falls_back_where_fused_is_refused(monkeypatch):
    import torch.utils._foreach_utils as fu

    monkeypatch.setattr(fu, "_get_fused_kernels_supported_devices", lambda: ["cuda"])  # as if CPU had no kernel
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = build_optimizer("adamw", [p], lr=1e-3, weight_decay=0.0)
    assert not opt.defaults["fused"]
    p.grad = torch.ones_like(p)
    opt.step()  # the default implementation runs
