"""``transformer_engine.common``: the recipes."""

from transformer_engine.common import recipe  # noqa: F401
