"""When the trainer evaluates, saves and stops: one pure function of the step and the config."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ift.training.config import RunConfig


@dataclass(frozen=True)
class Actions:
    """What to do after an optimizer step (in this order: evaluate, save, stop)."""

    evaluate: bool
    """Run the held-out evaluation (``train.eval_interval``)."""
    save: bool
    """Save a checkpoint of this step."""
    stop: bool
    """The run ends after this step: it reached ``train.steps`` (then it is complete) or
    ``train.exit_after_steps`` steps of this invocation (a later one resumes)."""
    complete: bool
    """The run reached ``train.steps``."""


def after_step(cfg: RunConfig, step: int, *, start_step: int, has_eval: bool) -> Actions:
    """The actions after the optimizer step that brought the run to ``step``.

    Args:
        cfg: the run's config.
        step: optimizer steps done so far (1-based count).
        start_step: the step this invocation started (or resumed) at.
        has_eval: the data has a held-out split.

    Returns:
        :class:`Actions`. Saves: every ``checkpoint.save_interval`` steps before the end, when
        ``train.exit_after_steps`` stops the invocation early, and at the end with
        ``checkpoint.save_on_exit``.
    """
    t, c = cfg.train, cfg.checkpoint
    complete = step >= t.steps
    interval = bool(c.save_interval) and step % c.save_interval == 0
    early = not complete and bool(t.exit_after_steps) and step - start_step >= t.exit_after_steps
    return Actions(
        evaluate=bool(t.eval_interval) and step % t.eval_interval == 0 and has_eval,
        save=(interval and not complete) or early or (complete and c.save_on_exit),
        stop=complete or early,
        complete=complete,
    )
