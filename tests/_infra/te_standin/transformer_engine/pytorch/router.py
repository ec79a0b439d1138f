"""``transformer_engine.pytorch.router`` (MoE routing kernels): imported by megatron-core at
module level for TE >= 2.7; not covered by the stand-in (refused when called)."""


def _not_covered(*_a, **_k):
    raise NotImplementedError("the Transformer Engine stand-in does not cover MoE routing")


fused_topk_with_score_function = _not_covered
fused_compute_score_for_moe_aux_loss = _not_covered
fused_moe_aux_loss = _not_covered
