"""Resuming reads only JSON and safetensors: planted pickles never run, and a bad checkpoint is one clear error.

A checkpoint handed over by someone else must not be able to run code (``torch.load`` of a pickle can), and a
truncated, empty, foreign or tampered one must be refused with an :class:`AdapterFileError` naming the file,
before anything of it reaches the model, the optimizer, the scheduler or the random generators.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorakit.cli import main
from lorakit.errors import AdapterFileError
from lorakit.training.checkpoint import STATE_VERSION, list_checkpoints
from lorakit.training.resume import read_checkpoint, restore_checkpoint
from lorakit.training.trainer import Trainer, train
from training.runs import adapter, assert_same_adapter, cli_args, config, write_data, write_model

FILES = ["trainer_state.json", "trainer_state.safetensors", "adapter_config.json", "adapter_model.safetensors"]
STEP3 = Path("checkpoints") / "step-00000003"
EXP_AVG = "optimizer.state.0.exp_avg"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny model, the data, and a finished 6-step run whose step-3 checkpoint the tests tamper with."""
    root = tmp_path_factory.mktemp("resume-safety")
    model_dir, data = write_model(root / "model"), write_data(root / "data")
    full = root / "full"
    train(config(model_dir, data, full), log=lambda s: None, progress=False)
    assert [s for s, _ in list_checkpoints(full)] == [3]
    return model_dir, data, full


def resume_copy(base, out: Path) -> Path:
    """A fresh output folder holding only the reference run's step-3 checkpoint; returns the checkpoint folder."""
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(base[2] / STEP3, out / STEP3)
    return out / STEP3


def resume(base, out: Path, **kw):
    return train(config(base[0], base[1], out, **{"resume": "latest", **kw}), log=lambda s: None, progress=False)


# -- pickles planted in a checkpoint never run ------------------------------------------------------------


class _Payload:
    """Unpickling this creates the folder ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture
def payload(tmp_path):
    """``(marker, raw pickle bytes, torch.save bytes)``, both checked to run the payload when unpickled."""
    marker = tmp_path / "PAYLOAD-RAN"
    raw = pickle.dumps({"state": _Payload(marker)})
    pickle.loads(raw)  # the payload is live: it really runs when unpickled
    assert marker.exists()
    marker.rmdir()
    zipped = tmp_path / "payload.pt"
    torch.save({"version": 1, "step": 3, "rng": _Payload(marker)}, zipped)
    torch.load(zipped, weights_only=False)
    assert marker.exists()
    marker.rmdir()
    return marker, raw, zipped.read_bytes()


def resume_refused(base, out: Path, marker: Path, **kw) -> str:
    """Resume into ``out``; checks that no planted pickle ran, then that the run was refused; returns the reason."""
    try:
        resume(base, out, **kw)
    except Exception as exc:  # checked below, after the payload
        error = exc
    else:
        error = None
    assert not marker.exists(), "a pickle planted in the checkpoint ran"
    assert isinstance(error, AdapterFileError), repr(error)
    assert not (out / "adapter_model.safetensors").exists()
    return str(error)


@pytest.mark.parametrize("planted", FILES)
def test_a_pickle_in_a_checkpoint_file_never_runs_and_the_error_names_the_file(base, tmp_path, payload, planted):
    marker, _, zipped = payload
    folder = resume_copy(base, tmp_path / "run")
    (folder / planted).write_bytes(zipped)
    assert str(folder / planted) in resume_refused(base, tmp_path / "run", marker)


def test_pickles_in_every_checkpoint_file_never_run(base, tmp_path, payload, capsys):
    """Every file of the checkpoint, plus an extra trainer_state.pt, holds a payload: none runs; the CLI says why."""
    marker, raw, zipped = payload
    folder = resume_copy(base, tmp_path / "run")
    for name in FILES:
        (folder / name).write_bytes(raw)
    (folder / "trainer_state.pt").write_bytes(zipped)
    code = main([*cli_args(base[0], base[1], tmp_path / "run"), "--resume"])
    assert not marker.exists(), "a pickle planted in the checkpoint ran"
    assert code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # above it: the model-loading progress bar
    assert last.startswith("lorakit train: error: checkpoint file " + str(folder / "trainer_state.json")), last


def test_an_extra_trainer_state_pt_is_never_opened(base, tmp_path, payload):
    """A new-format checkpoint with a stray (planted) trainer_state.pt resumes from its JSON and safetensors alone."""
    marker, _, zipped = payload
    folder = resume_copy(base, tmp_path / "run")
    (folder / "trainer_state.pt").write_bytes(zipped)
    try:
        result = resume(base, tmp_path / "run")
    finally:
        assert not marker.exists(), "a pickle planted in the checkpoint ran"
    assert result.steps == 6
    assert_same_adapter(base[2], tmp_path / "run")


@pytest.mark.parametrize("how", ["latest", "path"])
def test_old_pickle_based_checkpoints_are_refused_unopened(base, tmp_path, payload, how):
    marker, _, zipped = payload
    out = tmp_path / "run"
    folder = out / STEP3
    folder.mkdir(parents=True)
    shutil.copy(base[2] / STEP3 / "adapter_config.json", folder)
    shutil.copy(base[2] / STEP3 / "adapter_model.safetensors", folder)
    (folder / "trainer_state.json").write_text(json.dumps({"step": 3, "settings": {}, "history": []}))
    (folder / "trainer_state.pt").write_bytes(zipped)
    reason = resume_refused(base, out, marker, resume="latest" if how == "latest" else str(folder))
    assert re.search(r"old pickle-based checkpoint.*no longer reads", reason) and str(folder) in reason, reason


def test_checkpoints_hold_only_json_and_safetensors(base):
    folder = base[2] / STEP3
    # and the adapter's model card (README.md: markdown text, never read on resume; PEFT's checkpoints carry one too)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*FILES, "README.md"])
    assert (folder / "README.md").read_text(encoding="utf-8").startswith("---\n")
    for name in FILES:
        data = (folder / name).read_bytes()
        if name.endswith(".json"):
            assert isinstance(json.loads(data), dict)
        else:
            load_file(folder / name)
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["version"] == STATE_VERSION == 2 and state["step"] == 3
    with safe_open(str(folder / "trainer_state.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert {"rng.0.torch", EXP_AVG, f"{EXP_AVG}_sq", "optimizer.state.0.step"} <= keys


# -- corrupt, empty, foreign and tampered checkpoints: one AdapterFileError, nothing changed -----------------


def _json(name, edit):
    def mutate(folder: Path) -> None:
        doc = json.loads((folder / name).read_text())
        edit(doc)
        (folder / name).write_text(json.dumps(doc))

    return mutate


def _tensors(name, edit):
    def mutate(folder: Path) -> None:
        with safe_open(str(folder / name), "pt") as fh:
            metadata = fh.metadata()
        tensors = load_file(folder / name)
        edit(tensors)
        save_file(tensors, str(folder / name), metadata=metadata)

    return mutate


def _bytes(name, edit):
    def mutate(folder: Path) -> None:
        (folder / name).write_bytes(edit((folder / name).read_bytes()))

    return mutate


def _swap(key: str, make):
    """Set tensor ``key`` of trainer_state.safetensors to ``make(old tensor or None)``."""
    return _tensors("trainer_state.safetensors", lambda t: t.update({key: make(t.get(key))}))


def _both(first, second):
    return lambda folder: (first(folder), second(folder))


def _first_2d(tensors: dict, suffix: str) -> str:
    return next(k for k, t in tensors.items() if k.endswith(suffix) and t.dim() == 2 and t.shape[0] != t.shape[1])


def _rename_param(doc):
    doc["optimizer"]["state"]["999"] = doc["optimizer"]["state"].pop("0")


def _rename_param_tensors(t):
    for name in ("exp_avg", "exp_avg_sq", "step"):
        t[f"optimizer.state.999.{name}"] = t.pop(f"optimizer.state.0.{name}")


def _set(path: str, value):
    def edit(doc):
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return edit


def _delete(path: str):
    def edit(doc):
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[key]
        del node[last]

    return edit


S, J, A, C = "trainer_state.safetensors", "trainer_state.json", "adapter_model.safetensors", "adapter_config.json"
CORRUPT = {
    # trainer_state.json
    "json truncated": (J, _bytes(J, lambda b: b[: len(b) // 2]), "not valid JSON"),
    "json empty": (J, _bytes(J, lambda b: b""), "is empty"),
    "json binary": (J, _bytes(J, lambda b: b"\x80\x04\x95 binary"), "not UTF-8"),
    "json is a list": (J, _bytes(J, lambda b: b"[1, 2, 3]"), "not an object"),
    "json foreign": (J, _bytes(J, lambda b: b'{"hello": "world"}'), "not lorakit trainer state"),
    "json version 1": (J, _json(J, _set("version", 1)), "version 1"),
    "json no optimizer": (J, _json(J, _delete("optimizer")), "'optimizer' is missing"),
    "json step is text": (J, _json(J, _set("step", "3")), "'step' is a string"),
    "json history short": (J, _json(J, lambda d: d["history"].pop()), "history"),
    "json history nan": (J, _json(J, _set("history.1.loss", float("nan"))), "history"),
    "python rng short": (J, _json(J, lambda d: d["rng"][0]["python"][1].pop()), "random state"),
    "python rng floats": (J, _json(J, _set("rng.0.python.1.0", 0.5)), "random state"),
    "python rng is a dict": (J, _json(J, _set("rng.0.python", {"a": 1})), "random state"),
    "scheduler extra key": (J, _json(J, _set("scheduler.optimizer", 1)), "scheduler"),
    "scheduler wrong type": (J, _json(J, _set("scheduler.last_epoch", "3")), "scheduler.last_epoch"),
    "two param groups": (J, _json(J, lambda d: d["optimizer"]["param_groups"].append({})), "param_groups"),
    "param group lr nan": (J, _json(J, _set("optimizer.param_groups.0.lr", float("inf"))), "lr"),
    "param group foreign params": (J, _json(J, _set("optimizer.param_groups.0.params", [5] * 28)), "parameter"),
    # trainer_state.safetensors
    "tensors truncated": (S, _bytes(S, lambda b: b[: len(b) // 2]), "not a readable safetensors"),
    "tensors empty": (S, _bytes(S, lambda b: b""), "is empty"),
    "tensors are a pickle": (S, _bytes(S, lambda b: pickle.dumps({"a": 1})), "not a readable safetensors"),
    "tensors foreign": (S, lambda f: shutil.copy(f / A, f / S), "not lorakit trainer state"),
    "torch rng float": (S, _swap("rng.0.torch", lambda x: x.float()), "RNG state"),
    "torch rng short": (S, _swap("rng.0.torch", lambda x: x[:100]), "RNG state"),
    "torch rng 2-d": (S, _swap("rng.0.torch", lambda x: x[None]), "RNG state"),
    "torch rng missing": (S, _tensors(S, lambda t: t.pop("rng.0.torch")), "rng.0.torch"),
    "cuda rng gap": (S, _swap("rng.0.cuda.1", lambda x: torch.zeros(16, dtype=torch.uint8)), "CUDA"),
    "rng of another process": (S, _swap("rng.1.torch", lambda x: torch.get_rng_state()), "processes"),
    "unknown tensor": (S, _swap("hello", lambda x: torch.zeros(1)), "neither optimizer nor RNG"),
    "exp_avg transposed": (
        S,
        _tensors(S, lambda t: t.update({(k := _first_2d(t, ".exp_avg")): t[k].t().contiguous()})),
        "shape",
    ),
    "exp_avg integer": (S, _swap(EXP_AVG, lambda x: x.int()), "int32"),
    "exp_avg nan": (S, _swap(EXP_AVG, lambda x: x.fill_(float("nan"))), "NaN or Inf"),
    "exp_avg_sq missing": (S, _tensors(S, lambda t: t.pop(f"{EXP_AVG}_sq")), "exp_avg_sq"),
    "step not a scalar": (S, _swap("optimizer.state.0.step", lambda x: torch.ones(2)), "step"),
    "state of a param the json lacks": (S, _swap("optimizer.state.77.x", lambda x: torch.ones(1)), "77"),
    "state of a param the model lacks": (S, _both(_json(J, _rename_param), _tensors(S, _rename_param_tensors)), "999"),
    # the adapter
    "adapter truncated": (A, _bytes(A, lambda b: b[: len(b) - 7]), "not a readable safetensors"),
    "adapter empty": (A, _bytes(A, lambda b: b""), "is empty"),
    "adapter missing": (A, lambda f: (f / A).unlink(), "missing"),
    "adapter lacks a tensor": (A, _tensors(A, lambda t: t.pop(next(iter(t)))), "does not fit this model"),
    "adapter wrong shape": (
        A,
        _tensors(A, lambda t: t.update({(k := _first_2d(t, "lora_A.weight")): t[k].t().contiguous()})),
        "does not fit this model",
    ),
    "adapter nan": (A, _tensors(A, lambda t: next(iter(t.values())).fill_(float("nan"))), "non-finite"),
    "adapter integer": (A, _tensors(A, lambda t: t.update({k: v.int() for k, v in t.items()})), "not floating point"),
    "adapter config list": (C, _bytes(C, lambda b: b"[]"), "adapter config"),
    "adapter config missing": (C, lambda f: (f / C).unlink(), "missing"),
}  # fmt: skip


@pytest.fixture(scope="module")
def loaded(base, tmp_path_factory):
    """A trainer set up as ``--resume`` would be (model, optimizer, scheduler), nothing restored yet."""
    trainer = Trainer(config(base[0], base[1], tmp_path_factory.mktemp("loaded") / "out"), log=lambda s: None)
    trainer._load()
    return trainer


def _snapshot(trainer) -> dict:
    return {
        "params": [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad],
        "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
        "scheduler": trainer.scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
    }


def _same(a: dict, b: dict) -> bool:
    params = all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
    return (
        params
        and a["optimizer"] == b["optimizer"]
        and a["scheduler"] == b["scheduler"]
        and torch.equal(a["torch_rng"], b["torch_rng"])
        and a["python_rng"] == b["python_rng"]
    )


@pytest.mark.parametrize("variant", list(CORRUPT))
def test_a_corrupt_or_foreign_checkpoint_is_one_clear_error_and_changes_nothing(base, loaded, tmp_path, variant):
    named, mutate, reason = CORRUPT[variant]
    folder = resume_copy(base, tmp_path / "run")
    mutate(folder)
    before = _snapshot(loaded)
    with pytest.raises(AdapterFileError) as err:
        state = read_checkpoint(folder)
        restore_checkpoint(state, loaded.model, loaded.optimizer, loaded.scheduler)
    message = str(err.value)
    assert str(folder / named) in message and reason in message, message
    assert _same(before, _snapshot(loaded)), "something was loaded from a refused checkpoint"


@pytest.mark.parametrize("variant", ["json truncated", "tensors empty", "exp_avg transposed", "adapter nan"])
def test_resume_from_a_corrupt_checkpoint_fails_with_the_file_named(base, tmp_path, variant):
    named, mutate, reason = CORRUPT[variant]
    folder = resume_copy(base, tmp_path / "run")
    mutate(folder)
    with pytest.raises(AdapterFileError, match=reason) as err:
        resume(base, tmp_path / "run")
    assert str(folder / named) in str(err.value)


def test_a_checkpoint_restores_to_the_uninterrupted_run(base, loaded, tmp_path):
    """The API path: read + restore, then the trainer's remaining steps match the run that never stopped."""
    folder = resume_copy(base, tmp_path / "run")
    result = resume(base, tmp_path / "run")
    assert result.steps == 6 and result.metrics["resumed_from_step"] == 3
    assert_same_adapter(base[2], tmp_path / "run")
    assert read_checkpoint(folder).step == 3


# -- bitsandbytes' optimizers ------------------------------------------------------------------------------


@pytest.mark.parametrize("optim", ["adamw8bit", "paged_adamw"])
def test_bitsandbytes_optimizer_state_round_trips_to_the_uninterrupted_result(base, tmp_path, optim):
    pytest.importorskip("bitsandbytes", reason="8-bit optimizers need bitsandbytes (CI installs it)")
    # r=128: the factors reach bitsandbytes' 4096-value minimum for 8-bit state (absmax, qmap tensors)
    kw = dict(optim=optim, r=128, lora_alpha=256)
    full = tmp_path / "full"
    train(config(base[0], base[1], full, **kw), log=lambda s: None, progress=False)
    with safe_open(str(full / STEP3 / "trainer_state.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    if optim == "adamw8bit":
        assert any(k.endswith("__bnb_optimizer_quant_state__.absmax1") for k in keys), keys[:8]
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / STEP3, resumed / STEP3)
    train(config(base[0], base[1], resumed, resume="latest", **kw), log=lambda s: None, progress=False)
    assert_same_adapter(full, resumed)
    assert adapter(full)  # not empty
    if optim == "adamw8bit":  # a tampered block scale is refused like any other tensor
        bad = tmp_path / "bad"
        (bad / "checkpoints").mkdir(parents=True)
        shutil.copytree(full / STEP3, bad / STEP3)
        key = next(k for k in keys if k.endswith("absmax1"))
        _swap(key, lambda x: x[:-1])(bad / STEP3)
        with pytest.raises(AdapterFileError, match="absmax1.*shape"):
            train(config(base[0], base[1], bad, resume="latest", **kw), log=lambda s: None, progress=False)
