"""Text generation from megatron-ift checkpoints at any tensor/pipeline layout.

* :mod:`.loading`: build this rank's model chunk from a run directory or an imported
  checkpoint, with the architecture its ``megatron_ift.json`` records; find its tokenizer.
* :mod:`.sampling`: greedy, temperature and top-p choice of the next token (a frozen config).
* :mod:`.decoder`: the decoding loop on megatron-core's own KV cache
  (``StaticInferenceContext``), pipeline stages joined by point-to-point sends.
* :mod:`.cli`: ``megatron-ift generate`` (chat template, stop at EOS, progress bar).
"""
