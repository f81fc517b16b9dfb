"""GPU-only checks of ``lorakit train --dtype`` (run by ``benchmarks/gpu_check.sh``); on a machine without CUDA it
says so and exits 0.

Reproduce on a CUDA machine, from the repository root::

    bash benchmarks/gpu_check.sh --json benchmarks/results/gpu_check.json
    bash benchmarks/gpu_check.sh --model ~/.cache/lorakit/models/SmolLM2-135M-Instruct   # real weights

1. **Fused kernels on CUDA** (``lorakit.tuners.lora.fused``): LoRA and DoRA on an ``nn.Linear`` (1024 → 768,
   r 16, 4 × 128 tokens), fused path vs plain path (a forward hook on the base forces the plain one), output and
   gradients of x, A, B (and m): fp32 with TF32 off (relative error < 1e-5) and all-bf16 (< 2e-2); under
   ``torch.autocast("cuda", bfloat16)`` with fp32 adapters on a bf16 base, the fused kernels must step aside.
2. **DoRA's cached norm under the fused AdamW** (``lorakit.training.optim``): three steps with the norm cache on
   and off give the same losses.
3. **``lorakit train`` on CUDA** on the tests' tiny model: ``--dtype bf16`` and ``--dtype fp16`` (GradScaler),
   with a checkpoint at step 2 and a resume from it that must reach the uninterrupted adapter bit for bit; the
   adapter files hold fp32.
4. **A bf16 training step vs PEFT's on SmolLM2-135M** (real weights with ``--model``, else random weights of
   SmolLM2-135M's config: the same shapes, so the same time and memory): bf16 base, fp32 adapters (LoRA r 8,
   alpha 16, q,k,v,o,gate,up,down), forward under autocast, ``AdamW(fused=True)``; batches 8 × 64 and 16 × 512
   of random ids. Median seconds per step over ``--repeats`` interleaved repeats of ``--steps`` steps (after
   ``--warmup``), and peak memory of a step (``torch.cuda.max_memory_allocated`` above what was allocated before
   it), lorakit and PEFT from the same base weights; lorakit fp32 for reference.

Exit status 1 if a check of 1-3 fails (the JSON says which); 4 is a measurement.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = dict(  # SmolLM2-135M-Instruct's config.json (architecture fields)
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
    hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=2,
)  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEVICE = "cuda"  # --dry-run-on-cpu: checks 1-3 on the CPU (bf16 only), to try this script without a GPU


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))


# -- 1. fused kernels ---------------------------------------------------------------------------------------


def check_fused_kernels() -> dict[str, Any]:
    from lorakit.layers import kind_for
    from lorakit.tuners.lora import fused
    from lorakit.tuners.lora.layer import LoraLayer

    calls = []
    classes = (fused.LoraLinearFunction, fused.DoraLinearFunction)
    for cls in classes:  # count the fused kernels' calls (apply is torch.autograd.Function's classmethod)
        cls.apply = staticmethod(lambda *a, _real=cls.apply: calls.append(1) or _real(*a))
    torch.backends.cuda.matmul.allow_tf32 = False
    out: dict[str, Any] = {}
    try:
        for dora in (False, True):
            for name, base_dtype, adapter_dtype, tol in (
                ("fp32", torch.float32, torch.float32, 1e-5),
                ("bf16", torch.bfloat16, torch.bfloat16, 2e-2),
            ):
                torch.manual_seed(0)
                base = nn.Linear(1024, 768).to(DEVICE, base_dtype).requires_grad_(False)
                layer = LoraLayer(base, kind_for(base))
                layer.add("default", 16, 32, dtype=adapter_dtype, use_dora=dora)
                nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
                layer.set_active(["default"])
                x = torch.randn(4, 128, 1024, device=DEVICE, dtype=base_dtype, requires_grad=True)
                params = [p for p in layer.parameters() if p.requires_grad]
                calls.clear()
                y = layer(x)
                took_fused = len(calls) == 1
                grads = torch.autograd.grad(y.float().square().sum(), [x, *params])
                handle = base.register_forward_hook(lambda *a: None)
                y_plain = layer(x)
                handle.remove()
                plain = torch.autograd.grad(y_plain.float().square().sum(), [x, *params])
                errors = [_rel(y, y_plain)] + [_rel(g, p) for g, p in zip(grads, plain)]
                key = f"{'dora' if dora else 'lora'}_{name}"
                out[key] = {"fused_taken": took_fused, "max_rel_error": max(errors), "tolerance": tol}
                out[key]["ok"] = took_fused and max(errors) < tol
            torch.manual_seed(0)
            base = nn.Linear(1024, 768).to(DEVICE, torch.bfloat16).requires_grad_(False)
            layer = LoraLayer(base, kind_for(base))
            layer.add("default", 16, 32, dtype=torch.float32, use_dora=dora)
            layer.set_active(["default"])
            calls.clear()
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                y = layer(torch.randn(4, 128, 1024, device=DEVICE, requires_grad=True))
            key = f"{'dora' if dora else 'lora'}_autocast_steps_aside"
            out[key] = {"fused_taken": bool(calls), "out_dtype": str(y.dtype), "ok": not calls}
    finally:
        for cls in classes:
            del cls.apply  # the inherited classmethod again
    return out


# -- 2. DoRA's cache under the fused AdamW --------------------------------------------------------------------


def check_dora_cache_with_fused_adamw() -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit import LoraConfig, get_peft_model
    from lorakit.training.optim import build_optimizer
    from lorakit.tuners.lora.dora import DoraMagnitude

    losses = {}
    for cache in (True, False):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        model = get_peft_model(LlamaForCausalLM(cfg).to(DEVICE), LoraConfig(r=8, use_dora=True, target_modules=TARGETS))
        for module in model.modules():
            if isinstance(module, DoraMagnitude):
                module.cache_norm = cache
        model.train()
        opt = build_optimizer("adamw", [p for p in model.parameters() if p.requires_grad], 1e-2, 0.0)
        ids = torch.randint(0, 256, (4, 32), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
        losses[cache] = []
        for _ in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[cache].append(loss.item())
    return {"losses_cache_on": losses[True], "losses_cache_off": losses[False], "ok": losses[True] == losses[False]}


# -- 3. lorakit train on CUDA -------------------------------------------------------------------------------------


def check_train_cli(dtype: str, python: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT / "tests"))
    from training.runs import write_data, write_model

    work = Path(tempfile.mkdtemp(prefix=f"gpu_check_{dtype}_"))
    write_model(work / "model")
    write_data(work)
    base = [python, "-m", "lorakit", "train", "--model", str(work / "model"), "--data", str(work / "train.jsonl")]
    base += ["--device", DEVICE, "--dtype", dtype, "--max-steps", "4", "--save-every", "2", "--skip-eval"]
    base += ["--no-progress", "--rank", "4", "--alpha", "8", "--lr", "1e-2", "--batch-size", "2", "--dropout", "0.1"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}"}
    full = subprocess.run([*base, "-o", str(work / "full")], env=env, capture_output=True, text=True)
    result: dict[str, Any] = {"returncode": full.returncode}
    if full.returncode != 0:
        return {**result, "ok": False, "stderr": full.stderr[-3000:]}
    resumed = work / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    (work / "full" / "checkpoints" / "step-00000002").rename(resumed / "checkpoints" / "step-00000002")
    again = subprocess.run([*base, "-o", str(resumed), "--resume"], env=env, capture_output=True, text=True)
    if again.returncode != 0:
        return {**result, "ok": False, "resume_stderr": again.stderr[-3000:]}
    a = load_file(str(work / "full" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter_model.safetensors"))
    history = json.loads((work / "full" / "metrics.json").read_text())["history"]
    state = json.loads((resumed / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    result.update(
        losses=[h["loss"] for h in history],
        adapter_dtypes=sorted({str(t.dtype) for t in a.values()}),
        resume_bit_identical=all(torch.equal(a[k], b[k]) for k in a),
        grad_scaler=state.get("grad_scaler"),
        precision_line=next((line for line in full.stdout.splitlines() if line.startswith("precision")), None),
    )
    finite = all(h == h and abs(h) < float("inf") for h in result["losses"])
    scaler_ok = (state.get("grad_scaler") is not None) == (dtype == "fp16")
    result["ok"] = finite and result["adapter_dtypes"] == ["torch.float32"] and result["resume_bit_identical"]
    result["ok"] = result["ok"] and scaler_ok
    return result


# -- 4. bf16 step vs PEFT on SmolLM2 ------------------------------------------------------------------------------


def _smollm2(model_path: str | None) -> tuple[nn.Module, str]:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if model_path:
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16), f"weights from {model_path}"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2, rope_theta=100000.0)).to(torch.bfloat16)
    return model, "random weights, SmolLM2-135M's config"


def _variant(base: nn.Module, which: str) -> nn.Module:
    if which == "peft_bf16":
        import peft

        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    else:
        import lorakit

        source = copy.deepcopy(base) if which == "lorakit_bf16" else copy.deepcopy(base).float()
        model = lorakit.get_peft_model(source, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    return model.cuda().train()


def _stepper(model: nn.Module, ids: torch.Tensor, autocast: bool):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_bf16_vs_peft(model_path: str | None, warmup: int, repeats: int, steps: int) -> dict[str, Any]:
    base, source = _smollm2(model_path)
    out: dict[str, Any] = {"model": source, "shapes": {}}
    for batch, seq in ((8, 64), (16, 512)):
        ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
        ids = ids.cuda()
        steps_of, memory, trainable = {}, {}, {}
        for which in ("lorakit_bf16", "peft_bf16", "lorakit_fp32"):
            model = _variant(base, which)
            trainable[which] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}, which
            step = _stepper(model, ids, autocast=which != "lorakit_fp32")
            step()  # optimizer state exists from here on
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            memory[which] = torch.cuda.max_memory_allocated() - before
            steps_of[which] = (model, step)
        times: dict[str, list[float]] = {w: [] for w in steps_of}
        for _ in range(warmup):
            for _, step in steps_of.values():
                step()
        for _ in range(repeats):  # interleaved: the same conditions for every variant
            for which, (_, step) in steps_of.items():
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(steps):
                    step()
                torch.cuda.synchronize()
                times[which].append((time.perf_counter() - t0) / steps)
        med = {w: statistics.median(v) for w, v in times.items()}
        out["shapes"][f"{batch}x{seq}"] = {
            "median_step_s": med,
            "samples_s": times,
            "peak_step_memory_bytes": memory,
            "trainable_parameters": trainable,
            "lorakit_bf16_over_peft_bf16_time": med["lorakit_bf16"] / med["peft_bf16"],
            "lorakit_bf16_over_peft_bf16_memory": memory["lorakit_bf16"] / memory["peft_bf16"],
            "lorakit_bf16_over_lorakit_fp32_time": med["lorakit_bf16"] / med["lorakit_fp32"],
        }
        del steps_of
        torch.cuda.empty_cache()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--model", default=None, help="SmolLM2-135M folder (default: random weights, same shapes)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--skip-bench", action="store_true", help="the checks only")
    parser.add_argument("--dry-run-on-cpu", action="store_true", help="checks 1-3 on the CPU, bf16 only (no bench)")
    args = parser.parse_args()
    global DEVICE
    if args.dry_run_on_cpu:
        DEVICE, args.skip_bench = "cpu", True
    elif not torch.cuda.is_available():
        print("no CUDA device, nothing to check")
        return 0
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"
    results: dict[str, Any] = {"device": name, "torch": torch.__version__}
    checks = {
        "fused_kernels": check_fused_kernels,
        "dora_cache_fused_adamw": check_dora_cache_with_fused_adamw,
        "train_bf16": lambda: check_train_cli("bf16", sys.executable),
        "train_fp16": lambda: check_train_cli("fp16", sys.executable),
    }
    if DEVICE == "cpu":  # fp16 is refused on the CPU; the fp32 kernel check stays (tolerances hold there too)
        del checks["train_fp16"]
    failed = []
    for name, check in checks.items():
        t0 = time.perf_counter()
        try:
            results[name] = check()
        except Exception as exc:  # a check that breaks is a failed check, reported with the others
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        ok = results[name].get("ok", all(v.get("ok") for v in results[name].values() if isinstance(v, dict)))
        results[name]["ok"] = ok
        print(f"{name}: {'ok' if ok else 'FAILED'} ({time.perf_counter() - t0:.1f} s)", flush=True)
        if not ok:
            failed.append(name)
    if not args.skip_bench:
        results["bench_bf16_step_vs_peft"] = bench_bf16_vs_peft(args.model, args.warmup, args.repeats, args.steps)
        for shape, row in results["bench_bf16_step_vs_peft"]["shapes"].items():
            print(
                f"{shape}: lorakit bf16 {row['median_step_s']['lorakit_bf16'] * 1e3:.1f} ms, PEFT bf16 "
                f"{row['median_step_s']['peft_bf16'] * 1e3:.1f} ms (x{row['lorakit_bf16_over_peft_bf16_time']:.2f}); "
                f"peak memory x{row['lorakit_bf16_over_peft_bf16_memory']:.2f}"
            )
    print(json.dumps({k: v for k, v in results.items() if k != "bench_bf16_step_vs_peft"}, indent=1, default=str))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
