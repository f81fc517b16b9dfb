"""``lorakit train --output`` replaces only what lorakit writes, only when asked, and never an input.

Files lorakit writes there are refused unless ``--overwrite`` (which replaces those and leaves every other
file alone) or ``--resume``; an output that is or contains the model folder or a data file is refused; and
a second run writing into the same output while the first is still running is refused, naming the other
process.
"""

from __future__ import annotations

import signal

import pytest

from lorakit.cli import main
from lorakit.errors import AdapterFileError
from lorakit.training.output import LOCK_NAME
from lorakit.training.trainer import train
from training.runs import cli_args, config, start_training, write_data, write_model


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("output-folder")
    return write_model(root / "model"), write_data(root / "data")


def quiet(cfg):
    return train(cfg, log=lambda s: None, progress=False)


def test_a_users_files_are_refused_then_only_lorakits_names_are_replaced_with_overwrite(inputs, tmp_path):
    out = tmp_path / "run"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "plan.md").write_text("my notes")
    (out / "README.md").write_text("my readme")
    (out / "metrics.json").write_text('{"mine": true}')
    with pytest.raises(AdapterFileError, match=r"holds files lorakit train writes \(metrics.json\).*--overwrite"):
        quiet(config(*inputs, out, max_steps=2))
    assert (out / "metrics.json").read_text() == '{"mine": true}'
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["README.md", "metrics.json", "notes"]

    quiet(config(*inputs, out, max_steps=2, save_every=1, overwrite=True))
    assert (out / "notes" / "plan.md").read_text() == "my notes"
    assert (out / "README.md").read_text() == "my readme"
    assert '"mine"' not in (out / "metrics.json").read_text()
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "loss.png", "checkpoints", "model"])
def test_any_file_lorakit_writes_is_refused_without_overwrite(inputs, tmp_path, name):
    out = tmp_path / "run"
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    if name in ("checkpoints", "model"):
        (out / name).mkdir()
        (out / name / "keep.txt").write_text("mine")
    else:
        (out / name).write_bytes(b"mine")
    with pytest.raises(AdapterFileError, match=f"already holds .*{name}"):
        quiet(config(*inputs, out, max_steps=2))
    assert ((out / name / "keep.txt") if (out / name).is_dir() else (out / name)).read_bytes() == b"mine"


@pytest.mark.parametrize("where", ["model folder", "data folder", "parent of both"])
def test_an_output_that_is_or_contains_an_input_is_refused(inputs, where):
    model_dir, (train_file, _) = inputs
    out = {
        "model folder": model_dir,
        "data folder": train_file.parent,
        "parent of both": model_dir.parent,
    }[where]
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(AdapterFileError, match=r"--output .* (is|contains) the (base model|training data) input"):
        quiet(config(*inputs, out, max_steps=2, overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == before  # not even a lock file


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    first = start_training(cli_args(*inputs, out, max_steps=5000, save_every=0))
    try:
        assert main([*cli_args(*inputs, out, max_steps=2), "--overwrite"]) == 1
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"lorakit train --output {out}: another process is writing there" in last, last
        assert f"held by pid {first.pid}" in last, last
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM
    assert (out / LOCK_NAME).exists()  # the file stays; the lock on it ended with its run
    assert main([*cli_args(*inputs, out, max_steps=2), "--overwrite"]) == 0
