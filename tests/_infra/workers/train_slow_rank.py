"""``megatron_ift.train.main`` with one rank slowed down (``SLOW_RANK``: that rank's every model
forward sleeps ``SLOW_SECONDS``), a straggler for the compute-time spread to find.

Test instrumentation only: the model is wrapped here, never in the product.
"""

import os
import sys
import time

from megatron_ift.models import ift_model

if os.environ.get("RANK") == os.environ.get("SLOW_RANK"):
    _hidden_states = ift_model.IFTGPTModel.hidden_states

    def _slow_hidden_states(self, *args, **kwargs):
        time.sleep(float(os.environ.get("SLOW_SECONDS", "0.2")))
        return _hidden_states(self, *args, **kwargs)

    ift_model.IFTGPTModel.hidden_states = _slow_hidden_states

from megatron_ift.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
