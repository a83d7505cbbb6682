"""Fine-tuning with the SFR recipe: multi-task contrastive LoRA, task-homogeneous batches, teacher-mined negatives.

Modules: ``config`` (one typed TOML config), ``data`` (JSONL format + MTEB-folder builders), ``sampler``
(task-homogeneous batches), ``loss`` (InfoNCE, GradCache), ``mining`` (teacher hard negatives), ``distributed``
(all-gather with gradients, DDP/FSDP under torchrun), ``train`` (LoRA training, checkpoints, merge),
``evaluate`` (small STS / retrieval evaluators). Importing this package pulls no torch.
"""
