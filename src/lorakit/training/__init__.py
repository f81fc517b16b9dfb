"""Fine-tuning with LoRA: data preparation (:mod:`.data`) and exact-match evaluation (:mod:`.evaluate`)."""
