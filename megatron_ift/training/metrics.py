"""The FLOP model and the throughput figures of a training step.

One FLOP count serves both the training log's TFLOP/s and MFU (:func:`throughput`) and the
planner's step-time estimate (:func:`megatron_ift.planning.planner.step_cost`), so a logged MFU
can be compared with the utilisation a plan assumed.
"""

from __future__ import annotations

from megatron_ift.models.config import ModelConfig


def forward_flops_per_token(model: ModelConfig, seq_length: int) -> int:
    """FLOPs of one forward pass per token.

    2 per parameter (every GEMM weight, the output layer included; the norms' few weights too,
    a negligible overcount) except the input embedding, a lookup; plus the attention scores ``QK^T`` and their product with ``V`` over the whole sequence (no
    causal discount, as in Megatron-LM's and the PaLM paper's MFU). Megatron's vocabulary
    padding is not counted.

    Args:
        model: the architecture.
        seq_length: tokens per sequence.

    Returns:
        Forward FLOPs per token.
    """
    head_dim = model.kv_channels or model.hidden_size // model.num_attention_heads
    lookup = 0 if model.tie_embeddings else model.vocab_size * model.hidden_size
    gemm_params = model.num_parameters() - lookup
    attention = 4 * model.num_layers * seq_length * model.num_attention_heads * head_dim
    return 2 * gemm_params + attention


def step_flops(model: ModelConfig, *, global_batch_size: int, seq_length: int,
               estimation_pass: bool, full_recompute: bool = False) -> float:
    """FLOPs of one optimizer step over the global batch.

    In forward units: the training forward, its backward (2), IFT's estimation pass (1, when it
    runs) and the recomputed forward of full activation recomputation (1).

    Args:
        model: the architecture.
        global_batch_size, seq_length: the step's sequences and their length.
        estimation_pass: IFT's extra forward runs (lambda > 0).
        full_recompute: ``train.recompute == "full"``.

    Returns:
        FLOPs of the step, all GPUs together.
    """
    forward_units = 3 + (1 if estimation_pass else 0) + (1 if full_recompute else 0)
    return global_batch_size * seq_length * forward_flops_per_token(model, seq_length) * forward_units


def throughput(model: ModelConfig, *, global_batch_size: int, seq_length: int, seconds: float,
               world_size: int, estimation_pass: bool, full_recompute: bool,
               peak_tflops: float) -> dict[str, float]:
    """Throughput of one step that took ``seconds``.

    Args:
        model, global_batch_size, seq_length, estimation_pass, full_recompute: as
            :func:`step_flops`.
        seconds: the step's wall time.
        world_size: processes (GPUs) sharing the step.
        peak_tflops: one GPU's dense peak (``logging.peak_tflops``).

    Returns:
        ``tokens_per_second``, ``tflops_per_gpu`` and ``mfu`` (``tflops_per_gpu / peak_tflops``).
    """
    flops = step_flops(model, global_batch_size=global_batch_size, seq_length=seq_length,
                       estimation_pass=estimation_pass, full_recompute=full_recompute)
    tflops = flops / seconds / world_size / 1e12
    return {
        "tokens_per_second": global_batch_size * seq_length / seconds,
        "tflops_per_gpu": tflops,
        "mfu": tflops / peak_tflops,
    }
