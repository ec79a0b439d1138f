"""Load converted checkpoints at several TP/PP layouts, gather logits, optionally re-save.

Usage: ``convert_logits.py SPEC.json`` under torchrun; the world size must be divisible by every
layout's TP x PP (the rest is data parallelism). SPEC::

    {"layouts": [{"tp": 2, "pp": 2, "vpp": null,
                  "jobs": [{"ckpt": dir, "tokens": file.pt, "out": file.pt or null,
                            "resave": dir or null}]}],
     "keys_out": file.json or null}

The model-parallel groups are rebuilt in the same processes for each layout, so one launch
covers every layout. ``out`` receives the full padded-vocabulary logits ``[b, s, v]`` (layouts
without virtual pipeline stages).
``resave`` writes the loaded model back at that layout as a run folder (``iter_0000000`` +
metadata + ``latest``) with megatron_ift.checkpoint.model_io.save_model. ``keys_out`` records the
sharded keys and global shapes of the first job's model at the first layout.
"""

import json
import sys

if __name__ == "__main__":
    from convert_common import run_spec

    with open(sys.argv[1]) as f:
        run_spec(json.load(f))
