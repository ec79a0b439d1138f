"""The suite's plugin (tiers, ordering, the GPU skip) lives in the ``_infra`` package beside this
file (tests/_infra/README.md); pytest puts this folder on ``sys.path``, so tests import their
helpers as ``from _infra.launch import torchrun``."""

pytest_plugins = ["_infra.plugin"]
