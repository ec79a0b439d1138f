"""Checkpoint conversion between Hugging Face folders and megatron-core distributed checkpoints.

* :mod:`.arch`: one declarative name/shape map per architecture (Llama, Mistral, Qwen2), used by
  both directions.
* :mod:`.hf_config`: HF ``config.json`` <-> :class:`~megatron_ift.models.config.ModelConfig`.
* :mod:`.safetensors_io`: header-only scans, single-tensor reads and a streaming shard writer.
* :mod:`.streaming`: write a dist checkpoint item by item, read one layer slice at a time.
* :mod:`.import_hf` / :mod:`.export_hf`: the two conversions; :mod:`.cli`: their command line.

Both directions stream: peak memory is a small multiple of the largest single tensor, never the
whole model (see ``docs/conversion.md``).
"""

from megatron_ift.errors import ConversionError

__all__ = ["ConversionError"]
