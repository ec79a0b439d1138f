"""Checkpoints: run-directory layout, model-only I/O (conversion, fine-tuning starts) and full
training state (model, optimizer, scheduler, sampler, RNG) on megatron-core dist_checkpointing."""
