"""GPT model building on megatron-core."""
