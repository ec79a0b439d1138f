"""megatron-ift: Intuitive Fine-Tuning (arXiv 2405.11870) on megatron-core GPT models."""

import warnings as _warnings

__version__ = "0.1.0"

# megatron-core warns on import when Transformer Engine / apex are absent (always the case on
# CPU, where the project uses the local implementations on purpose) and about a cuda-graph
# default it sets itself. They are expected here and say nothing the user can act on, so they
# are silenced, each by its own message; every other warning still shows. Installed at package
# import so that spawned helper processes, which re-import the package, inherit them.
for _message in (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"Transformer Engine is not installed",
    r"full scope is deprecated",
):
    _warnings.filterwarnings("ignore", message=_message, category=UserWarning)
del _message
