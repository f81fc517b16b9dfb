"""One process of a 2-process HF Trainer run with accelerate's FSDP2 on CPU (gloo), started by torchrun from
tests/integrations/test_trainer_fsdp.py.

accelerate 1.15 takes its FSDP branch only on accelerators (for ``MULTI_CPU`` it never sets
``DistributedType.FSDP``), while PyTorch's ``fully_shard`` itself runs on CPU with gloo. So this script lets
accelerate's state see a multi-device run while it is built, and everything after that (accelerate's
``fully_shard`` of the model, the Trainer's FSDP checkpoints, lorakit's mixin) is the real code a GPU run takes.

Usage: fsdp_trainer_run.py OUT STATE_DICT_TYPE [RESUME_FROM]: 4 steps, checkpoints at 2 and 4,
``save_model(OUT/final)``, logits of one batch written by rank 0 to OUT/logits.pt. (FSDP1 cannot be built on CPU
even so: accelerate's FSDP1 plugin asks for an accelerator device.)
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import accelerate.state as accelerate_state  # noqa: E402
import torch  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from conftest import tiny_llama  # noqa: E402
from lorakit import LoraConfig, get_peft_model  # noqa: E402
from lorakit.integrations import Trainer  # noqa: E402
from test_trainer import pattern_data  # noqa: E402

_build = accelerate_state.AcceleratorState.__init__


def _build_as_on_accelerators(self, *args, **kwargs):
    partial = accelerate_state.PartialState()
    was = partial.distributed_type
    if was != DistributedType.MULTI_CPU or kwargs.get("fsdp_plugin") is None:
        return _build(self, *args, **kwargs)
    accelerate_state.PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    try:
        _build(self, *args, **kwargs)
    finally:
        accelerate_state.PartialState._shared_state["distributed_type"] = was


accelerate_state.AcceleratorState.__init__ = _build_as_on_accelerators


def main() -> None:
    out, state_dict_type = sys.argv[1:3]
    resume = sys.argv[3] if len(sys.argv) > 3 else None
    config = LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(tiny_llama(initializer_range=0.5), config)
    fsdp_config = {"fsdp_version": 2, "state_dict_type": state_dict_type, "reshard_after_forward": True}  # full_shard
    args = TrainingArguments(
        out,
        max_steps=4,
        per_device_train_batch_size=2,
        save_steps=2,
        learning_rate=1e-2,
        report_to=[],
        seed=0,
        disable_tqdm=True,
        use_cpu=True,
        fsdp=True,
        fsdp_config=fsdp_config,
    )
    trainer = Trainer(model=model, args=args, train_dataset=pattern_data(32))
    assert trainer.is_fsdp_enabled
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(os.path.join(out, "final"))
    ids = pattern_data(1)[0]["input_ids"][None]
    model.eval()
    with torch.no_grad():
        logits = trainer.model_wrapped(input_ids=ids).logits  # every process: FSDP gathers each unit's shards
    if trainer.args.process_index == 0:
        torch.save(logits, os.path.join(out, "logits.pt"))
    print(f"rank {trainer.args.process_index} done", flush=True)


if __name__ == "__main__":
    main()
