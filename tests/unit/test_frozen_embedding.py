"""The detached-mixing rule (an untied input embedding never trains): derived, applied and
checked by megatron_ift.training.frozen_embedding alone."""

import pytest
import torch

from megatron_ift.training.frozen_embedding import (
    check_input_embedding,
    freeze_input_embedding,
    input_embedding_frozen,
)


class _Chunk(torch.nn.Module):
    """The attributes of a megatron-core GPTModel chunk the rule reads."""

    def __init__(self, *, pre_process: bool, tied: bool) -> None:
        super().__init__()
        self.pre_process = pre_process
        self.share_embeddings_and_output_weights = tied
        self.embedding = torch.nn.Module()
        self.embedding.word_embeddings = torch.nn.Embedding(8, 4)


@pytest.mark.parametrize("mixing,tied,frozen", [
    ("detached", False, True), ("detached", True, False), ("live", False, False), ("live", True, False),
])
def test_rule_applied_and_checked(mixing, tied, frozen):
    assert input_embedding_frozen(mixing, tied) is frozen
    first, later = _Chunk(pre_process=True, tied=tied), _Chunk(pre_process=False, tied=tied)
    if frozen:  # a model built without the rule is refused by the step's check
        with pytest.raises(ValueError, match="mixing_embeddings='detached' with untied"):
            check_input_embedding([first], mixing)
    freeze_input_embedding([first, later], mixing)
    check_input_embedding([first, later], mixing)
    assert first.embedding.word_embeddings.weight.requires_grad is not frozen
    assert later.embedding.word_embeddings.weight.requires_grad  # no input embedding there
