"""Training: the two-pass IFT step on megatron-core schedules, model/optimizer set-up, the loop."""
