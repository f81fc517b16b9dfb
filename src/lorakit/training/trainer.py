"""The training loop behind ``lorakit train``: LoRA on a causal LM, completion-only loss, exact resume, DDP/FSDP.

One optimizer step consumes a *global batch* of ``G = batch_size × grad_accum × world_size`` examples:
epoch ``e`` is a permutation drawn from a generator seeded with ``seed + e``; step ``k`` of the epoch takes
positions ``[kG, (k+1)G)`` (the last incomplete batch of an epoch is skipped), and micro-batch ``j`` of
process ``p`` takes the slice ``[(j·world + p)·B, ... + B)`` of it.

The loss is the mean cross-entropy over *every supervised token of the global batch* (not a mean of
micro-batch means): each micro-batch contributes ``Σ token losses / N_global``. So the gradient does not
depend on how the batch is split across micro-batches or processes, and ``torchrun --nproc_per_node 2``
with ``--batch-size 2`` gives the adapter one process with ``--batch-size 4`` gives (up to float summation
order). Under DDP the gradient all-reduce averages over processes, so each process scales its loss by
``world_size`` to turn that average back into the sum; FSDP's reduce-scatter averages the same way
(:mod:`lorakit.training.fsdp`). ``--dtype bf16/fp16`` is :mod:`lorakit.training.precision`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import lorakit.cpu_blas as cpu_blas
from lorakit.errors import AdapterFileError, ConfigError, DataError, LorakitError, TrainingDivergedError
from lorakit.hub import load_model
from lorakit.io import atomic_write_dir
from lorakit.kbit import (
    enable_activation_checkpointing,
    prepare_model_for_kbit_training,
    quantize,
    replace_lora_weights_loftq,
)
from lorakit.layers import kind_for
from lorakit.targeting import select_targets
from lorakit.training import checkpoint as ckpt
from lorakit.training import distributed as dist_utils
from lorakit.training import fsdp as fsdp_utils
from lorakit.training import precision as prec
from lorakit.training import resume
from lorakit.training.allocator import keep_freed_memory
from lorakit.training.config import TrainConfig
from lorakit.training.data import BUNDLED, build_dataset, collate, eval_pairs, resolve_data
from lorakit.training.evaluate import exact_match
from lorakit.training.methods import FULL, TITLES, TRAIN_METHODS, adapter_config
from lorakit.training.optim import _fused_adamw_ok, build_optimizer  # noqa: F401 (their home before optim.py)
from lorakit.training.output import prepare_output
from lorakit.training.report import plot_loss, side_by_side, write_metrics
from lorakit.training.starts import InitialAdapter, create_adapter, rewrites_base
from lorakit.tuners.lora import LoraConfig
from lorakit.tuners.lora.loraplus import loraplus_param_groups

#: Settings a resumed run must share with its checkpoint to reach the uninterrupted result.
RESUME_KEYS = [
    "model", "method", "data", "r", "lora_alpha", "lora_dropout", "use_dora", "bits", "quant_type", "double_quant",
    "loftq", "init_r", "tinit", "tfinal", "orth_reg_weight", "num_virtual_tokens", "prompt_init_text",
    "reduction_factor", "target_modules", "learning_rate", "weight_decay",
    "optim", "global_batch", "max_length", "overflow", "seed", "scheduler", "warmup_steps", "max_grad_norm",
    "total_steps", "dtype", "fsdp", "loraplus_ratio", "lora_bias", "init_lora_weights",
    "trainable_token_indices", "target_parameters",
]  # fmt: skip


@dataclass
class TrainResult:
    output: Path
    steps: int
    interrupted: bool = False
    checkpoint: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    stop_signal: int | None = None  #: the signal that interrupted the run (SIGINT, SIGTERM)


class _StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM (schedulers, ``docker stop``) sets a flag checked between optimizer steps.

    A second signal interrupts at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> _StopFlag:
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)


class Trainer:
    """Runs one :class:`TrainConfig`. ``log`` receives human-readable lines (rank 0 only)."""

    def __init__(self, cfg: TrainConfig, log: Any = print, progress: bool = True) -> None:
        self.cfg = cfg
        self.world = dist_utils.setup(cfg.device)
        self._log = log
        self.progress = progress
        self._held: contextlib.ExitStack | None = None  # what run() holds until it ends (the output's lock)
        self.initial: InitialAdapter | None = None  # the adapter as PiSSA/OLoRA created it (lorakit.training.starts)

    def log(self, text: str) -> None:
        if self.world.is_main:
            self._log(text)

    # -- set-up -------------------------------------------------------------------------------------

    def _load(self) -> None:
        cfg, world = self.cfg, self.world
        self.output, error = Path(cfg.output).expanduser(), None
        if world.is_main:
            try:
                self.output = prepare_output(cfg, self._held)
            except LorakitError as exc:
                error = exc
        error = dist_utils.broadcast_object(world, error)  # every process stops, none waits at a barrier
        if error is not None:
            raise error
        seed_everything(cfg.seed)
        if cfg.keep_freed_memory and world.device.type == "cpu":
            kept = keep_freed_memory()
            self.log(
                "CPU memory: freed blocks kept for the next step (no page faults per step; --no-keep-freed-memory "
                "turns this off)"
                if kept
                else "CPU memory: this C library cannot keep freed blocks (glibc only); steps fault their pages in"
            )
        if world.device.type == "cpu":
            self.log(f"CPU BLAS: {cpu_blas.decision}; MKL branch in force: {cpu_blas.mkl_branch() or 'unknown'}")
        self.precision = prec.resolve(cfg.dtype, world.device)
        if cfg.fsdp:
            fsdp_utils.check_world(world)
        t0 = time.perf_counter()
        model, tokenizer = load_model(cfg.model, dtype=self.precision.base_dtype(trains_base=cfg.method == FULL))
        self.tokenizer = tokenizer
        self.log(
            f"model: {getattr(model.config, '_name_or_path', cfg.model)} ({time.perf_counter() - t0:.1f} s to load)"
        )

        self.train_path = resolve_data(cfg.data, "train")
        self.train_set, self.data_report = build_dataset(self.train_path, tokenizer, cfg.max_length, cfg.overflow)
        self.log(f"data: {self.data_report.summary()}")
        self.eval_set = []
        if cfg.skip_eval:
            pass
        elif cfg.eval_data is not None:
            self.eval_set = eval_pairs(resolve_data(cfg.eval_data, "eval"))
        elif _is_bundled(cfg.data):
            self.eval_set = eval_pairs(resolve_data(cfg.data, "eval"))
        else:
            self.log("no --eval-data given: skipping the exact-match evaluation")
        if cfg.eval_limit is not None:
            self.eval_set = self.eval_set[: cfg.eval_limit]

        self.global_batch = cfg.batch_size * cfg.grad_accum * world.size
        self.steps_per_epoch = len(self.train_set) // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{self.train_path}: {len(self.train_set)} usable examples, fewer than one global batch of "
                f"{self.global_batch} (batch size {cfg.batch_size} x grad accum {cfg.grad_accum} x {world.size} "
                f"processes); lower --batch-size or --grad-accum, or add data"
            )
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))

        if cfg.method == FULL:  # the baseline LoRA is compared against: every weight trains
            self.model = model.to(world.device)
            for p in self.model.parameters():
                p.requires_grad_(True)
            trainable = total = sum(p.numel() for p in self.model.parameters())
            self.log(f"full fine-tuning: {total:,} trainable parameters")
        else:
            lora, pad_id = adapter_config(cfg, model, self.total_steps), tokenizer.pad_token_id
            model = model.to(world.device)
            originals = _target_weights(model, lora) if cfg.loftq else None
            if cfg.bits is not None:  # QLoRA: quantize on the training device, then freeze and upcast
                model = quantize(model, bits=cfg.bits, quant_type=cfg.quant_type, double_quant=cfg.double_quant)
                prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
                self.log(
                    f"base quantized to {cfg.bits} bit"
                    + (f" ({cfg.quant_type}, double quant {cfg.double_quant})" if cfg.bits == 4 else "")
                )
            elif cfg.gradient_checkpointing:
                enable_activation_checkpointing(model)
            self.model = create_adapter(model, lora, cfg.init_lora_weights, self.train_set, pad_id, cfg.batch_size)
            if rewrites_base(cfg.init_lora_weights):
                self.initial = InitialAdapter(self.model, self._held, world.is_main)
            if originals is not None:  # LoftQ: A, B fitted to W − Q, the base left as quantized
                t1 = time.perf_counter()
                fits = replace_lora_weights_loftq(self.model, weights=originals).values()
                before = math.sqrt(sum(f["quantization_error"] ** 2 for f in fits))
                after = math.sqrt(sum(f["loftq_error"] ** 2 for f in fits))
                self.log(
                    f"LoftQ start: ‖W − Q‖ {before:.1f} -> ‖W − (Q + s·BA)‖ {after:.1f} "
                    f"({after / before - 1:+.1%}, {time.perf_counter() - t1:.1f} s)"
                )
                del originals
            trainable, total = self.model.get_nb_trainable_parameters()
            method = TRAIN_METHODS[cfg.method].describe(cfg, lora)
            self.log(f"{method}: {trainable:,} trainable of {total:,} ({trainable / total:.3%})")
        self.trainable, self.total = trainable, total
        upcast = prec.upcast_trainable(self.model)
        described = self.precision.describe(trains_base=cfg.method == FULL)
        self.log(described + (f" ({len(upcast)} trainable tensors upcast to fp32)" if upcast else ""))
        self.scaler = self.precision.grad_scaler()
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.slice_logits = _supports_logit_mask(base)
        if cfg.fsdp:  # before the optimizer: fully_shard swaps the parameters for DTensors
            units = fsdp_utils.shard(self.model, world)
            self.log(
                f"FSDP: {len(units)} fully_shard units over {world.size} processes ({len(units) - 1} blocks + root)"
            )

        from lorakit.training.schedules import get_scheduler  # not transformers': it imports PEFT and bitsandbytes

        params: list = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.loraplus_ratio is not None:  # LoRA+ (arXiv 2402.12354): B factors at lr x ratio
            params = loraplus_param_groups(
                self.model, lr=cfg.learning_rate, ratio=cfg.loraplus_ratio, weight_decay=cfg.weight_decay
            )
        self.optimizer = build_optimizer(cfg.optim, params, cfg.learning_rate, cfg.weight_decay)
        self.scheduler = get_scheduler(cfg.scheduler, self.optimizer, cfg.warmup_steps, self.total_steps)

    def _facts(self) -> dict[str, Any]:
        facts = {k: getattr(self.cfg, k) for k in RESUME_KEYS if hasattr(self.cfg, k)}
        facts.update(global_batch=self.global_batch, total_steps=self.total_steps, data=str(self.train_path))
        return facts

    # -- the loop -----------------------------------------------------------------------------------

    def _global_indices(self, step: int) -> list[int]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        gen = torch.Generator().manual_seed(self.cfg.seed + epoch)
        perm = torch.randperm(len(self.train_set), generator=gen)
        return perm[pos * self.global_batch : (pos + 1) * self.global_batch].tolist()

    def _supervised_tokens(self, indices: list[int]) -> int:
        # labels are shifted by one for next-token prediction: position 0 is never a target
        return sum(sum(1 for t in self.train_set[i]["labels"][1:] if t != -100) for i in indices)

    def _micro_batches(self, indices: list[int]) -> list[list[int]]:
        b, w, r = self.cfg.batch_size, self.world.size, self.world.rank
        return [indices[(j * w + r) * b : (j * w + r + 1) * b] for j in range(self.cfg.grad_accum)]

    def _step(self, step: int, net: Any) -> tuple[float, int]:
        """One optimizer step; returns (global mean loss, tokens processed by all processes)."""
        indices = self._global_indices(step)
        n_tok = self._supervised_tokens(indices)
        loss_sum, tokens = 0.0, 0
        micro = self._micro_batches(indices)
        for j, part in enumerate(micro):
            batch = collate([self.train_set[i] for i in part], self.tokenizer.pad_token_id)
            batch = dist_utils.to_device(batch, self.world.device)
            sync = self.world.distributed and j < len(micro) - 1
            with self._no_sync(net) if sync else contextlib.nullcontext():
                with self.precision.autocast():
                    loss = self._loss_sum(net, batch)
                scaled = loss * (self.world.size / max(n_tok, 1))
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += loss.item()
            tokens += int(batch["attention_mask"].sum())
        loss_sum, tokens = dist_utils.all_sum(self.world, [loss_sum, float(tokens)])
        if not math.isfinite(loss_sum):  # before the update: the weights stay those of the last good step
            self.optimizer.zero_grad(set_to_none=True)
            raise self._diverged(step + 1, f"the loss is {loss_sum / max(n_tok, 1)}")
        if self.scaler is not None:  # fp16: gradients back to their true size before clipping
            self.scaler.unscale_(self.optimizer)
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], self.cfg.max_grad_norm
            )
        if self.scaler is not None:  # skips the update when a gradient overflowed, and adapts the scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / max(n_tok, 1), int(tokens)

    def _no_sync(self, net: Any) -> Any:
        return fsdp_utils.no_sync(self.model) if self.cfg.fsdp else net.no_sync()

    def _diverged(self, step: int, what: str) -> TrainingDivergedError:
        found = ckpt.list_checkpoints(self.output)
        kept = f"the last good checkpoint is {found[-1][1]}" if found else "no checkpoint was written before it"
        return TrainingDivergedError(
            f"training diverged at step {step} of {self.total_steps}: {what}; nothing from this step was saved, "
            f"{kept}, and --output keeps the adapter it held before (if any). Lower --lr (now "
            f"{self.cfg.learning_rate:g}), add --warmup-steps, or lower --max-grad-norm, and start a new run"
        )

    def _check_finite_weights(self, step: int) -> None:
        """Refuse to save trained weights holding NaN or Inf (a divergence the loss did not show yet)."""
        trained = [(n, fsdp_utils.local(p)) for n, p in self.model.named_parameters() if p.requires_grad]
        bad = next((name for name, p in trained if not bool(torch.isfinite(p).all())), None)
        # under FSDP each process holds shards: all stop together if any process found one
        if self.cfg.fsdp and dist_utils.all_sum(self.world, [float(bad is not None)])[0] and bad is None:
            bad = "(a shard on another process)"
        if bad is not None:
            raise self._diverged(step, f"the trained weight {bad} holds NaN or Inf")

    def _loss_sum(self, net: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ cross-entropy over the supervised next-token targets of a micro-batch.

        Only positions whose next token is supervised need logits. Where the model supports it (transformers'
        ``logits_to_keep`` with a boolean mask), the output head runs on those positions alone — on the
        bundled task 11 of ~46 per example, which saves most of the ``(tokens × vocabulary)`` head product and
        its logits. The loss is the same sum either way.
        """
        targets = batch["labels"][:, 1:]  # (B, T-1): the token each position predicts
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.slice_logits:
            keep = torch.zeros_like(batch["labels"], dtype=torch.bool)  # (B, T)
            keep[:, :-1] = targets != -100
            logits = net(**inputs, logits_to_keep=keep).logits  # (K, V), K = supervised positions
            return F.cross_entropy(logits.float(), targets[keep[:, :-1]], reduction="sum")
        logits = net(**inputs).logits  # (B, T, V); (B, P + T, V) when a prompt method puts P virtual tokens first
        logits = logits[:, logits.shape[1] - batch["labels"].shape[1] :]
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum"
        )

    def _save_checkpoint(self, step: int, history: list[dict[str, Any]]) -> Path | None:
        self._check_finite_weights(step)  # every process holds the same weights: all stop together
        states = dist_utils.gather_objects(self.world, ckpt.rng_state())
        fsdp = self.cfg.fsdp
        optimizer = fsdp_utils.GatheredOptimizer(self.optimizer) if fsdp else self.optimizer
        path = None
        with fsdp_utils.whole_adapters(self.model) if fsdp else contextlib.nullcontext():
            if self.world.is_main:
                info: dict[str, Any] = {"settings": self._facts(), "history": history}
                if self.scaler is not None:
                    info["grad_scaler"] = prec.scaler_state(self.scaler)
                path = ckpt.save_checkpoint(
                    self.output, step, self.model, optimizer, self.scheduler, states, info, self.cfg.keep_checkpoints
                )
        dist_utils.barrier(self.world)
        return path

    def _resume(self) -> tuple[int, list[dict[str, Any]]]:
        if self.cfg.method == FULL:
            raise ConfigError("--resume is supported for adapter runs; method 'full' is a baseline without resume")
        no_resume = TRAIN_METHODS[self.cfg.method].no_resume
        if no_resume:
            raise ConfigError(f"--resume is not supported for {TITLES[self.cfg.method]} runs yet: {no_resume}")
        folder = ckpt.find_resume_checkpoint(Path(self.cfg.output).expanduser(), self.cfg.resume)
        state = resume.read_checkpoint(folder)  # every file checked; nothing loaded yet
        # settings added after a checkpoint was written take their default (the behaviour it was trained with)
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in RESUME_KEYS}
        saved = {**defaults, **state.info["settings"]}
        resume.check_compatible(saved, self._facts(), RESUME_KEYS)
        if state.step > self.total_steps:
            raise AdapterFileError(f"checkpoint {folder} is at step {state.step}, past this run's {self.total_steps}")
        if len(state.rng) != self.world.size:
            raise ConfigError(
                f"checkpoint {folder} was written by {len(state.rng)} processes; this run has {self.world.size}"
            )
        place = fsdp_utils.place_like if self.cfg.fsdp else None
        resume.restore_checkpoint(state, self.model, self.optimizer, self.scheduler, self.world.rank, place=place)
        if self.scaler is not None and "grad_scaler" in state.info:
            self.scaler.load_state_dict(state.info["grad_scaler"])
        self.log(f"resumed from {folder} at step {state.step}")
        return state.step, list(state.info["history"])

    def _evaluate(self, label: str) -> Any:
        if not self.eval_set or not (self.world.is_main or self.cfg.fsdp):  # FSDP: every process takes part
            return None
        t0 = time.perf_counter()
        result = exact_match(
            self.model,
            self.tokenizer,
            self.eval_set,
            max_new_tokens=self.cfg.max_new_tokens,
            batch_size=self.cfg.eval_batch_size,
        )
        took = time.perf_counter() - t0
        self.log(f"eval {label}: exact match {result.correct}/{result.total} = {result.accuracy:.1%} ({took:.0f} s)")
        return result

    def run(self) -> TrainResult:
        """Train; the output folder stays locked (:data:`~lorakit.training.output.LOCK_NAME`) until the run ends."""
        finished = False
        try:
            with contextlib.ExitStack() as self._held:
                result = self._run()
            finished = True
            return result
        finally:  # after a clean run every process leaves together (rank 0 may still be writing its files)
            dist_utils.teardown(self.world, synchronize=finished)

    def _run(self) -> TrainResult:
        cfg, world = self.cfg, self.world
        self._load()
        before = self._evaluate_before() if self.initial else None  # the start is the base until a resume loads
        start, history = self._resume() if cfg.resume else (0, [])
        if cfg.overwrite and not cfg.resume and world.is_main:
            self._set_aside_old_checkpoints()
        if not self.initial:
            before = self._evaluate_before()
        dist_utils.barrier(world)

        net: Any = self.model
        if world.distributed and not cfg.fsdp:
            net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[world.device.index] if world.device.type == "cuda" else None
            )
        self.model.train()
        bar = None
        if world.is_main and self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=start, unit="step", dynamic_ncols=True, desc="train")
        t_start = time.perf_counter()
        interrupted, last_ckpt, step = False, None, start
        with _StopFlag() as stop:
            self.log(
                f"training steps {start + 1}-{self.total_steps} (global batch {self.global_batch}); Ctrl-C or "
                "SIGTERM stops at the next step with a checkpoint"
            )
            while step < self.total_steps:
                t0 = time.perf_counter()
                loss, tokens = self._step(step, net)
                step += 1
                dt = time.perf_counter() - t0
                lr = self.scheduler.get_last_lr()[0]
                history.append({"step": step, "loss": loss, "lr": lr, "tokens_per_s": tokens / dt, "seconds": dt})
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:.0f}", refresh=False)
                    bar.update(1)
                stop_now = dist_utils.all_sum(world, [float(stop.requested)])[0] > 0
                if stop_now or (cfg.save_every and step % cfg.save_every == 0 and step < self.total_steps):
                    last_ckpt = self._save_checkpoint(step, history)
                if stop_now:
                    interrupted = True
                    break
        if bar is not None:
            bar.close()
        train_time = time.perf_counter() - t_start
        self.model.eval()
        if interrupted:
            self.log(f"\ninterrupted at step {step}/{self.total_steps}; checkpoint saved in {last_ckpt}")
            self.log(
                f"continue with the same command plus --resume (it resumes from {last_ckpt.name if last_ckpt else '?'})"
            )
            return TrainResult(self.output, step, interrupted=True, checkpoint=last_ckpt, stop_signal=stop.signum)

        self._check_finite_weights(step)
        with fsdp_utils.whole_adapters(self.model) if cfg.fsdp else contextlib.nullcontext():
            if world.is_main:
                self._save_final()
        dist_utils.barrier(world)
        after = self._evaluate("after training")
        metrics = self._metrics(history, before, after, train_time, start)
        if world.is_main:
            write_metrics(self.output / "metrics.json", metrics)
            plot_loss(
                history,
                self.output / "loss.png",
                title=f"lorakit train: {TITLES[cfg.method]}"
                + (f" r={cfg.r}" if cfg.method != FULL and TRAIN_METHODS[cfg.method].uses_rank else "")
                + f" on {self.train_path.name}",
            )
            if before is not None and after is not None:
                self.log("\n" + side_by_side(before, after, cfg.samples))
            if cfg.method != FULL:
                self.log(f"\nadapter: {self.output}/adapter_model.safetensors (+ adapter_config.json)")
            else:
                self.log(f"\nfull model: {self.output}/model/")
            self.log(f"metrics: {self.output}/metrics.json   loss curve: {self.output}/loss.png")
        return TrainResult(self.output, step, metrics=metrics)

    def _evaluate_before(self) -> Any:
        if not (self.eval_set and self.cfg.eval_before):
            return None
        # the adapter as PiSSA/OLoRA created it computes the base model (disabled, the model is the residual)
        plain = self.cfg.method == FULL or self.initial is not None
        with contextlib.nullcontext() if plain else self.model.disable_adapter():
            return self._evaluate("before training (base model)")

    def _save_final(self) -> None:
        if self.initial is not None:
            self.initial.save(self.model, self.output)  # plain LoRA of rank 2r for the original base
            self.log(f"{self.cfg.init_lora_weights} adapter saved as plain LoRA of rank {2 * self.cfg.r} for the base")
            return
        if self.cfg.method != FULL:
            self.model.save_pretrained(self.output)  # adapter files, each replaced atomically
            return

        def fill(tmp: Path) -> None:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)

        atomic_write_dir(self.output / "model", fill)

    def _set_aside_old_checkpoints(self) -> None:
        old = self.output / ckpt.CHECKPOINTS
        if old.is_dir():
            prev = self.output / f"{ckpt.CHECKPOINTS}.previous"
            if prev.exists():
                import shutil

                shutil.rmtree(prev)
            old.rename(prev)
            self.log(f"--overwrite: the previous run's checkpoints moved to {prev}")

    def _metrics(self, history, before, after, train_time, start) -> dict[str, Any]:
        def ev(result: Any) -> dict[str, Any] | None:
            if result is None:
                return None
            keys = ("accuracy", "correct", "total", "contains")
            out = {k: getattr(result, k) for k in keys if hasattr(result, k)}
            out["samples"] = result.samples[: max(self.cfg.samples, 0) * 4]
            return out

        tail = history[-max(1, len(history) // 10) :]
        return {
            "config": self.cfg.to_dict(),
            "data": self.data_report.to_dict() if hasattr(self.data_report, "to_dict") else str(self.data_report),
            "world_size": self.world.size,
            "global_batch": self.global_batch,
            "total_steps": self.total_steps,
            "resumed_from_step": start or None,
            "trainable_parameters": self.trainable,
            "total_parameters": self.total,
            "train_seconds_this_process": train_time,
            "final_loss_mean_last_10pct": sum(h["loss"] for h in tail) / len(tail) if tail else None,
            "eval_before": ev(before),
            "eval_after": ev(after),
            "history": history,
        }


def _target_weights(model: Any, lora: LoraConfig) -> dict[str, torch.Tensor]:
    """Copies of the full-precision weights ``lora`` will adapt, as ``(out, in)`` matrices, by module name."""
    weights = {}
    for name in select_targets(model, lora):
        module = model.get_submodule(name)
        kind = kind_for(module)
        if kind is not None and not kind.quantized:
            weights[name] = kind.weight_matrix(module).detach().clone()
    return weights


def _supports_logit_mask(model: Any) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` and this transformers slices by a boolean mask."""
    import inspect

    from transformers import modeling_utils

    params = inspect.signature(model.forward).parameters
    return "logits_to_keep" in params and hasattr(modeling_utils, "slice_logits_to_keep")


def _is_bundled(spec: str | None) -> bool:
    return spec is None or spec in BUNDLED or spec.startswith("bundled:")


def train(cfg: TrainConfig, log: Any = print, progress: bool = True) -> TrainResult:
    """Run :class:`Trainer` for ``cfg`` (see the module docstring for batching, loss and DDP semantics)."""
    return Trainer(cfg, log=log, progress=progress).run()
