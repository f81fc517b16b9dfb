"""An adapter folder changes as a unit: killed saves, concurrent writers and leftovers (issue 15, item 4).

The kill tests fork a child that saves and dies (``os._exit``, no clean-up runs) at one named point between
the save's file operations (:func:`lorakit.io.crash_point`); the parent then reads the folder as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import input_ids, tiny_llama
from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit import io as lkio
from lorakit.errors import AdapterFileError

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="kill tests fork a child process")


def marked_model(alpha: float, seed: int = 0) -> PeftModel:
    """An adapter whose config (lora_alpha) and weights (every lora_B value) carry the same mark."""
    model = get_peft_model(tiny_llama(seed=seed), LoraConfig(r=2, lora_alpha=alpha, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(alpha)
    return model


def read_mark(folder: Path) -> float:
    """The mark of the adapter in ``folder``, checking that its config and weights belong to one save."""
    alpha = json.loads((folder / "adapter_config.json").read_text())["lora_alpha"]
    values = {
        float(t.flatten()[0]) for k, t in load_file(folder / "adapter_model.safetensors").items() if "lora_B" in k
    }
    assert values == {float(alpha)}, f"config of one save (alpha {alpha}) beside weights of another {values}"
    return float(alpha)


def save_points(folder: Path, model: PeftModel, monkeypatch) -> list[str]:
    """The crash points of one save, in order."""
    seen: list[str] = []
    monkeypatch.setattr(lkio, "crash_point", seen.append)
    model.save_pretrained(folder)
    monkeypatch.undo()
    return seen


def die_at(point: str, save) -> None:
    """Fork; the child runs ``save`` and dies at ``point`` without any clean-up; the parent waits."""
    pid = os.fork()
    if pid == 0:  # child

        def crash(label: str) -> None:
            if label == point:
                os._exit(137)

        lkio.crash_point = crash
        try:
            save()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) in (0, 137)


def test_a_save_killed_at_any_point_leaves_the_old_or_the_new_adapter(tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    old, new = marked_model(1.0), marked_model(2.0)
    points = save_points(folder, old, monkeypatch)
    assert len(points) >= 5, points
    committed = points.index("journal written")
    for i, point in enumerate(points):
        old.save_pretrained(folder)
        die_at(point, lambda: new.save_pretrained(folder))
        # a reader sees one whole save: the old one until the journal is written, the new one from then on
        # (completed by the reader)
        loaded = PeftModel.from_pretrained(tiny_llama(), folder)
        mark = float(loaded.peft_config["default"].lora_alpha)
        assert mark == (2.0 if i >= committed else 1.0), point
        assert read_mark(folder) == mark
        # the next save succeeds and removes what the killed one left
        old.save_pretrained(folder)
        assert read_mark(folder) == 1.0
        assert not [p for p in os.listdir(folder) if p.startswith(".")], f"leftovers after {point}"


def test_killed_save_leftovers_are_removed_by_the_next_save(tmp_path):
    folder = tmp_path / "adapter"
    model = marked_model(1.0)
    model.save_pretrained(folder)
    die_at("staged adapter_model.safetensors", lambda: marked_model(2.0).save_pretrained(folder))
    assert [p for p in os.listdir(folder) if p.startswith(".")], "the killed save should have left a temporary file"
    assert read_mark(folder) == 1.0
    model.save_pretrained(folder)
    assert sorted(os.listdir(folder)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_a_folder_swap_killed_at_any_point_leaves_the_old_or_the_new_folder(tmp_path, monkeypatch):
    target = tmp_path / "merged"

    def fill(text):
        def write(folder: Path) -> None:
            (folder / "a.txt").write_text(text)
            (folder / "b.txt").write_text(text)

        return write

    seen: list[str] = []
    monkeypatch.setattr(lkio, "crash_point", seen.append)
    lkio.atomic_write_dir(target, fill("old"))
    monkeypatch.undo()
    # both swap strategies: one atomic exchange, and two renames where the system lacks it
    for exchange in (True, False):
        if not exchange:
            monkeypatch.setattr(lkio, "_exchange", lambda a, b: False)
        points = (
            ["folder filled", "folder swapped"] if exchange else ["folder filled", "old folder aside", "folder renamed"]
        )
        for point in points:
            lkio.atomic_write_dir(target, fill("old"))
            die_at(point, lambda: lkio.atomic_write_dir(target, fill("new")))
            lkio.atomic_write_dir(target.with_name("other"), fill("x"))  # a save beside it: no effect on target
            # the next save to the place restores or cleans up; in between the folder reads whole or is aside
            lkio.atomic_write_dir(target, fill("newest"))
            assert (target / "a.txt").read_text() == (target / "b.txt").read_text() == "newest"
            assert sorted(os.listdir(tmp_path)) == ["merged", "other"], (point, os.listdir(tmp_path))


def test_folder_killed_between_two_renames_is_restored_by_the_next_save(tmp_path, monkeypatch):
    target = tmp_path / "merged"
    lkio.atomic_write_dir(target, lambda f: (f / "a.txt").write_text("old"))
    monkeypatch.setattr(lkio, "_exchange", lambda a, b: False)
    die_at("old folder aside", lambda: lkio.atomic_write_dir(target, lambda f: (f / "a.txt").write_text("new")))
    assert not target.exists()  # the old folder sits aside under a hidden name, whole

    def failing(folder):
        raise RuntimeError("the next save to the place fails too")

    with pytest.raises(RuntimeError):
        lkio.atomic_write_dir(target, failing)
    assert (target / "a.txt").read_text() == "old"  # restored first, and kept
    assert sorted(os.listdir(tmp_path)) == ["merged"]


def test_two_threads_saving_to_one_folder_never_mix_config_and_weights(tmp_path):
    folder = tmp_path / "adapter"
    models = [marked_model(1.0), marked_model(2.0, seed=1)]
    models[0].save_pretrained(folder)
    errors: list[BaseException] = []
    marks: list[float] = []

    def writer(model):
        try:
            for _ in range(100):
                model.save_pretrained(folder)
        except BaseException as exc:  # reported below
            errors.append(exc)

    def reader():
        try:
            for _ in range(100):
                loaded = PeftModel.from_pretrained(tiny_llama(), folder)
                alpha = loaded.peft_config["default"].lora_alpha
                b = next(p for n, p in loaded.named_parameters() if "lora_B" in n)
                assert float(b.flatten()[0]) == alpha  # config and weights of the same save
                marks.append(alpha)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(m,)) for m in models] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert read_mark(folder) in (1.0, 2.0)
    assert len(marks) == 100
    assert not [p for p in os.listdir(folder) if p.startswith(".")]


SAVE_LOOP = """
import sys, torch
sys.path.insert(0, {tests!r})
from conftest import input_ids, tiny_llama
from lorakit import LoraConfig, get_peft_model
alpha = float(sys.argv[1])
model = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=alpha, target_modules=["q_proj"]))
with torch.no_grad():
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.fill_(alpha)
for _ in range(20):
    model.save_pretrained(sys.argv[2])
"""


def test_two_processes_saving_to_one_folder_never_mix_config_and_weights(tmp_path):
    folder = tmp_path / "adapter"
    script = tmp_path / "save_loop.py"
    script.write_text(SAVE_LOOP.format(tests=str(Path(__file__).parent)))
    procs = [subprocess.Popen([sys.executable, str(script), a, str(folder)]) for a in ("1.0", "2.0")]
    seen = set()
    while any(p.poll() is None for p in procs):
        if (folder / "adapter_model.safetensors").exists():
            with lkio.reading_folder(folder):
                seen.add(read_mark(folder))
        time.sleep(0.005)
    assert [p.wait() for p in procs] == [0, 0]
    seen.add(read_mark(folder))
    assert seen <= {1.0, 2.0}


def test_an_unwritable_folder_with_an_unfinished_save_is_reported(tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    marked_model(1.0).save_pretrained(folder)
    die_at("journal written", lambda: marked_model(2.0).save_pretrained(folder))
    assert (folder / lkio.JOURNAL_NAME).exists()

    def read_only(src, dst):  # what a read-only mount answers (root ignores chmod, so it is simulated)
        raise PermissionError(13, "Permission denied", src)

    monkeypatch.setattr(lkio.os, "replace", read_only)
    with pytest.raises(AdapterFileError, match="interrupted.*Permission denied"):
        PeftModel.from_pretrained(tiny_llama(), folder)
    monkeypatch.undo()
    PeftModel.from_pretrained(tiny_llama(), folder)  # with write access the save is completed on read
    assert read_mark(folder) == 2.0


def test_a_journal_naming_paths_outside_its_folder_is_refused(tmp_path):
    folder = tmp_path / "adapter"
    marked_model(1.0).save_pretrained(folder)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (folder / lkio.JOURNAL_NAME).write_text(json.dumps({"renames": [["adapter_config.json", "../victim.txt"]]}))
    with pytest.raises(AdapterFileError, match="outside its folder"):
        PeftModel.from_pretrained(tiny_llama(), folder)
    assert victim.read_text() == "keep"


def test_a_full_disk_during_a_save_is_one_clear_error_and_keeps_the_adapter(tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    marked_model(1.0).save_pretrained(folder)
    import lorakit.persistence as persistence

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(persistence, "save_file", full)
    with pytest.raises(AdapterFileError, match="No space left on device.*unchanged"):
        marked_model(2.0).save_pretrained(folder)
    monkeypatch.undo()
    assert read_mark(folder) == 1.0
    assert not [p for p in os.listdir(folder) if p.startswith(".")]


def test_a_full_disk_during_a_folder_save_is_one_clear_error(tmp_path):
    target = tmp_path / "merged"
    lkio.atomic_write_dir(target, lambda f: (f / "a.txt").write_text("old"))

    def full(folder):
        raise OSError(5, "Input/output error")

    with pytest.raises(AdapterFileError, match="Input/output error.*unchanged"):
        lkio.atomic_write_dir(target, full)
    assert (target / "a.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["merged"]


def test_saving_in_the_other_format_replaces_the_weights_file(tmp_path):
    folder = tmp_path / "adapter"
    marked_model(1.0).save_pretrained(folder, safe_serialization=False)
    marked_model(2.0).save_pretrained(folder)
    assert sorted(os.listdir(folder)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    marked_model(3.0).save_pretrained(folder, safe_serialization=False)
    assert sorted(os.listdir(folder)) == ["README.md", "adapter_config.json", "adapter_model.bin"]
    loaded = PeftModel.from_pretrained(tiny_llama(), folder)
    assert loaded.peft_config["default"].lora_alpha == 3.0


def test_exclusive_lock_refuses_a_second_holder(tmp_path):
    lock = tmp_path / ".lock"
    with lkio.exclusive_lock(lock, "job one"):
        with pytest.raises(AdapterFileError, match=rf"job two: another process.*pid {os.getpid()}"):
            with lkio.exclusive_lock(lock, "job two"):
                pass
    with lkio.exclusive_lock(lock, "job three"):  # released
        pass


def test_a_save_killed_just_before_a_reader_locks_is_completed_not_deadlocked(tmp_path, monkeypatch):
    """The journal of a save killed between a reader's recovery and its lock is completed by that reader."""
    folder = tmp_path / "adapter"
    marked_model(1.0).save_pretrained(folder)
    die_at("journal written", lambda: marked_model(2.0).save_pretrained(folder))
    real, calls = lkio.recover_folder, []

    def late(path):  # the first recovery happens "before" the kill: it finds nothing yet
        calls.append(path)
        if len(calls) > 1:
            real(path)

    monkeypatch.setattr(lkio, "recover_folder", late)
    result: list = []
    reader = threading.Thread(target=lambda: result.append(PeftModel.from_pretrained(tiny_llama(), folder)))
    reader.daemon = True
    reader.start()
    reader.join(timeout=60)
    assert not reader.is_alive(), "the reader deadlocked on its own shared lock"
    assert result and result[0].peft_config["default"].lora_alpha == 2.0
    assert read_mark(folder) == 2.0


def test_saved_files_get_the_mode_a_plain_write_gives(tmp_path):
    folder = tmp_path / "adapter"
    marked_model(1.0).save_pretrained(folder)
    (tmp_path / "plain").write_text("x")
    expected = (tmp_path / "plain").stat().st_mode & 0o777
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (folder / name).stat().st_mode & 0o777 == expected, name


def test_a_checkpoint_save_killed_at_any_point_leaves_complete_checkpoints(tmp_path, monkeypatch):
    from lorakit.training import checkpoint as ckpt
    from lorakit.training.resume import read_checkpoint

    model = marked_model(1.0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model(input_ids()).logits.sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    def save(step):
        info = {"settings": {}, "history": [{"step": i + 1, "loss": 1.0} for i in range(step)]}
        return ckpt.save_checkpoint(tmp_path, step, model, optimizer, scheduler, [ckpt.rng_state()], info, keep=2)

    save(1)
    save(2)
    seen: list[str] = []
    monkeypatch.setattr(lkio, "crash_point", seen.append)
    save(3)  # with two kept already: one is deleted
    monkeypatch.undo()
    assert {"folder filled", "journal written", "old checkpoint aside"} <= set(seen)  # adapter, swap, deletion
    for i, point in enumerate(dict.fromkeys(seen)):
        step = 10 + 2 * i
        save(step)
        die_at(point, lambda s=step: save(s + 1))
        for found_step, folder in ckpt.list_checkpoints(tmp_path):  # only whole checkpoints carry a step name
            assert read_checkpoint(folder).step == found_step, point
        assert ckpt.list_checkpoints(tmp_path)[-1][0] in (step, step + 1)
        save(step + 2)  # the next save cleans up after the killed one
        names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
        assert names == [f"step-{step + 1:08d}", f"step-{step + 2:08d}"] or names == [
            f"step-{step:08d}",
            f"step-{step + 2:08d}",
        ], (point, names)
