"""The run directory's policy: one run at a time (a lock), never clobber another run, and what a
resume may change.

``checkpoint.dir`` belongs to one run. :class:`RunLock` keeps a second trainer out while the first
lives; :func:`check_run_directory` decides between a fresh start, a resume, and a refusal; and
:func:`resume_changes` compares the options of a resumed run with the ones saved in its
checkpoint, so that nothing a user changed is ignored silently:

* **architecture** (``model.*`` except the run-time keys below): another run; refused unless
  ``checkpoint.overwrite=true`` (which deletes the old checkpoints).
* **schedule** (``train.steps``, ``optimizer.lr`` / ``min_lr`` / ``weight_decay`` / warm-up /
  decay style): the learning-rate scheduler restored from the checkpoint holds the old values.
  Refused unless ``checkpoint.override_scheduler=true``, which applies the new schedule from the
  checkpoint's step on (Megatron-LM's ``--override-opt_param-scheduler``).
* **optimizer state** (optimizer type, Adam betas / eps, SGD momentum, loss scaling): restored
  from the checkpoint's optimizer state; cannot change on resume (start a new run from the
  checkpoint with ``checkpoint.pretrained`` instead).
* **run-time** (dropout and other run-time model keys, ``ift.*``, data and batch options,
  ``train.seed``, gradient clipping, FP8): applied, and listed on the screen.
* **free** (``checkpoint.*``, ``logging.*``, the parallel layout, evaluation, recomputation,
  failure policy, ``train.exit_after_steps``): applied without comment.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from megatron_ift.checkpoint import layout
from megatron_ift.config_io import to_dict
from megatron_ift.errors import ConfigError

LOCK_NAME = "run.lock"

RUNTIME_MODEL_KEYS = frozenset({
    "model.hidden_dropout", "model.attention_dropout", "model.transformer_impl",
    "model.attention_backend",
})
SCHEDULE_KEYS = frozenset({
    "train.steps", "optimizer.lr", "optimizer.min_lr", "optimizer.weight_decay",
    "optimizer.lr_decay_style", "optimizer.lr_warmup_fraction", "optimizer.lr_warmup_steps",
})
OPTIMIZER_STATE_KEYS = frozenset({
    "optimizer.optimizer", "optimizer.adam_beta1", "optimizer.adam_beta2", "optimizer.adam_eps",
    "optimizer.sgd_momentum", "optimizer.initial_loss_scale", "optimizer.loss_scale",
})
_FREE_SECTIONS = ("checkpoint.", "logging.", "parallel.")
_FREE_KEYS = frozenset({
    "train.exit_after_steps", "train.eval_interval", "train.eval_max_batches",
    "train.nonfinite_policy", "train.max_skipped_steps", "train.recompute",
    "train.recompute_num_layers", "data.num_proc", "data.cache_dir",
})


# -- what changed since the checkpoint -------------------------------------------------------

def _flatten(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, tree


def _same(a: Any, b: Any) -> bool:
    # JSON turns tuples into lists; YAML may give 3 where the checkpoint has 3.0.
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


@dataclass(frozen=True, kw_only=True)
class ResumeChanges:
    """Options that differ between the checkpoint (old) and this run (new), by category.

    Each list holds ``(dotted key, old, new)``."""

    architecture: list
    schedule: list
    optimizer_state: list
    runtime: list

    @staticmethod
    def describe(items: list) -> str:
        return ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in items)


def resume_changes(saved: dict[str, Any], current: dict[str, Any]) -> ResumeChanges:
    """Compare the run config saved with a checkpoint with this run's (both as plain dicts).

    Args:
        saved: ``megatron_ift.json``'s ``config`` entry (``to_dict`` of the saved RunConfig).
        current: ``to_dict`` of this run's RunConfig.

    Returns:
        The differing keys sorted into the categories of this module's docstring.
    """
    old, new = dict(_flatten(saved)), dict(_flatten(current))
    cats: dict[str, list] = {"architecture": [], "schedule": [], "optimizer_state": [], "runtime": []}
    for key in sorted(set(old) | set(new)):
        if key in old and key in new and _same(old[key], new[key]):
            continue
        if key.startswith(_FREE_SECTIONS) or key in _FREE_KEYS:
            continue
        item = (key, old.get(key), new.get(key))
        if key.startswith("model.") and key not in RUNTIME_MODEL_KEYS:
            cats["architecture"].append(item)
        elif key in SCHEDULE_KEYS:
            cats["schedule"].append(item)
        elif key in OPTIMIZER_STATE_KEYS:
            cats["optimizer_state"].append(item)
        else:
            cats["runtime"].append(item)
    return ResumeChanges(**cats)


def check_resume_options(ckpt: str, saved: dict[str, Any], cfg) -> list[str]:
    """Refuse a resume whose changed options would be ignored; returns lines to report.

    Args:
        ckpt: the checkpoint folder resumed from (for messages).
        saved: its metadata's ``config`` (may be empty for old checkpoints: nothing to compare).
        cfg: this run's RunConfig.

    Returns:
        Lines describing the changes that are applied (empty when nothing changed).

    Raises:
        ConfigError: a schedule change without ``checkpoint.override_scheduler=true``, or a
            change of optimizer-state options.
    """
    if not saved:
        return []
    ch = resume_changes(saved, to_dict(cfg))
    if ch.optimizer_state:
        raise ConfigError(
            f"resuming {ckpt}: {ch.describe(ch.optimizer_state)} changed, but the optimizer "
            "state restored from the checkpoint holds the old values. Restore them, or start a "
            f"new run from it (checkpoint.pretrained={ckpt} and a new checkpoint.dir)"
        )
    lines = []
    if ch.schedule:
        if not cfg.checkpoint.override_scheduler:
            raise ConfigError(
                f"resuming {ckpt}: {ch.describe(ch.schedule)} changed, but the learning-rate "
                "schedule is restored from the checkpoint. Set checkpoint.override_scheduler=true "
                "to apply the new schedule from the checkpoint's step on, or restore the old values"
            )
        lines.append(f"resume: new schedule applied (checkpoint.override_scheduler): "
                     f"{ch.describe(ch.schedule)}")
    if ch.runtime:
        model = [c for c in ch.runtime if c[0] in RUNTIME_MODEL_KEYS]
        other = [c for c in ch.runtime if c[0] not in RUNTIME_MODEL_KEYS]
        if model:
            lines.append(f"resume: run-time model options changed, applied: {ch.describe(model)}")
        if other:
            lines.append(f"resume: options changed since the checkpoint, applied: {ch.describe(other)}")
    return lines


# -- fresh start, resume or refusal ------------------------------------------------------------

def check_run_directory(cfg) -> Optional[str]:
    """The checkpoint to resume from, ``"overwrite"``, or None for a fresh start.

    Args:
        cfg: the RunConfig.

    Returns:
        The ``iter_*`` folder to resume from; ``"overwrite"`` when another run's checkpoints are
        to be deleted (``checkpoint.overwrite``); None when there is nothing to resume.

    Raises:
        ConfigError: ``checkpoint.dir`` is a file, holds a model-only (imported) checkpoint, or
            another run's checkpoints (different architecture) without ``checkpoint.overwrite``.
        CheckpointError: ``latest`` names a missing or incomplete checkpoint.
    """
    root = cfg.checkpoint.dir
    if os.path.exists(root) and not os.path.isdir(root):
        raise ConfigError(f"checkpoint.dir={root} is a file, not a folder; choose a folder path")
    if not os.path.isdir(root):
        return None
    existing = layout.list_checkpoints(root)
    has_latest = os.path.exists(os.path.join(root, layout.LATEST))
    ckpt = layout.resolve(root) if existing or has_latest else None
    if ckpt is None and not existing:
        return None
    ckpt = ckpt or existing[-1][1]
    meta = layout.read_metadata(ckpt)
    if "config" not in meta:
        raise ConfigError(
            f"checkpoint.dir={root} holds a model-only checkpoint ({ckpt}, e.g. written by "
            f"'megatron-ift convert import-hf'), not a training run: set "
            f"checkpoint.pretrained={root} and a new checkpoint.dir"
        )
    changes = resume_changes({"model": meta.get("model", {})}, {"model": to_dict(cfg.model)})
    if changes.architecture:
        if cfg.checkpoint.overwrite:
            return "overwrite"
        raise ConfigError(
            f"checkpoint.dir={root} holds checkpoints of another run (different model "
            f"architecture: {changes.describe(changes.architecture)}). Use a new checkpoint.dir, "
            "or set checkpoint.overwrite=true to delete them and start over"
        )
    check_resume_options(ckpt, meta.get("config", {}), cfg)
    return ckpt


def delete_checkpoints(root: str) -> None:
    """Remove every checkpoint and the ``latest`` / ``COMPLETED`` markers under ``root``."""
    for _, path in layout.list_checkpoints(root):
        shutil.rmtree(path)
    for name in (layout.LATEST, layout.COMPLETED):
        p = os.path.join(root, name)
        if os.path.exists(p):
            os.remove(p)


def mark_complete(root: str, steps: int) -> None:
    """Record that the run in ``root`` reached ``train.steps`` (``COMPLETED`` holds the count)."""
    layout.atomic_write_text(os.path.join(root, layout.COMPLETED), f"{steps}\n")


def mark_incomplete(root: str) -> None:
    """A resumed run continues past its old end (``train.steps`` raised): not complete any more."""
    completed = os.path.join(root, layout.COMPLETED)
    if os.path.exists(completed):
        os.remove(completed)


# -- one run per directory -------------------------------------------------------------------

def process_start_time(pid: int) -> Optional[str]:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if it is not alive.

    Recorded with the pid so that a recycled pid is not mistaken for the lock's holder."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return "?"
        return "?"


class RunLock:
    """``<checkpoint.dir>/run.lock``: the holder's host, pid, process start time and Slurm job.

    Taken by global rank 0 before anything is written to the directory and released when the
    run ends. A lock is stale (taken over) when its holder ran on this host and that process is
    gone, or when it belongs to this same Slurm job (a requeued job restarts with the job id of
    the run it replaces). Otherwise only ``checkpoint.break_lock=true`` takes it.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self.path = os.path.join(root, LOCK_NAME)
        self.held = False

    def _mine(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start": process_start_time(os.getpid()),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }

    def holder(self) -> Optional[dict[str, Any]]:
        """The lock file's content; ``{}`` if unreadable; None if there is no lock."""
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _stale(self, h: dict[str, Any]) -> bool:
        job = os.environ.get("SLURM_JOB_ID", "")
        if job and h.get("slurm_job_id") == job:
            return True
        if h.get("host") != socket.gethostname() or not isinstance(h.get("pid"), int):
            return False
        start = process_start_time(h["pid"])
        return start is None or (start != "?" and h.get("start") not in (None, "?", start))

    def acquire(self, *, break_lock: bool = False) -> None:
        """Take the lock or raise.

        Raises:
            ConfigError: another live run holds it (the message names the holder), or
                ``checkpoint.dir`` cannot be created.
        """
        try:
            os.makedirs(self.root, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ConfigError(f"checkpoint.dir={self.root} is a file, not a folder; choose a folder path") from None
        except OSError as exc:
            raise ConfigError(f"checkpoint.dir={self.root} cannot be created: {exc.strerror}") from None
        tmp = f"{self.path}.{socket.gethostname()}.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self._mine(), f)
        try:
            for _ in range(2):
                try:
                    os.link(tmp, self.path)  # atomic: fails if a lock exists (also over NFS)
                    self.held = True
                    return
                except FileExistsError:
                    h = self.holder()
                    if h is None:
                        continue  # released in between
                    if break_lock or self._stale(h) or h == {}:
                        os.remove(self.path)
                        continue
                    raise ConfigError(
                        f"checkpoint.dir={self.root} is in use by another run (pid {h.get('pid')} "
                        f"on {h.get('host')} since {h.get('since')}; lock file {self.path}). Wait for "
                        "it to end or use another checkpoint.dir; if that run is gone, set "
                        "checkpoint.break_lock=true"
                    ) from None
            raise ConfigError(f"could not take the lock {self.path}; retry, or set checkpoint.break_lock=true")
        finally:
            os.remove(tmp)

    def release(self) -> None:
        """Remove the lock if this process holds it (idempotent). Best effort: on a folder that
        became read-only the file stays, and the next run sees its holder is gone (stale)."""
        if not self.held:
            return
        self.held = False
        h = self.holder()
        if h and h.get("pid") == os.getpid() and h.get("host") == socket.gethostname():
            try:
                os.remove(self.path)
            except OSError:
                pass


def write_resolved_config(root: str, text: str, config_path: Optional[str]) -> str:
    """Write the resolved config into the run folder; returns the file written.

    It goes to ``<root>/config.yaml``, unless that file is the ``--config`` the run was started
    with (a user's file is never overwritten): then to ``<root>/config.resolved.yaml``.
    """
    target = os.path.join(root, "config.yaml")
    if config_path and os.path.exists(target) and os.path.samefile(config_path, target):
        target = os.path.join(root, "config.resolved.yaml")
    layout.atomic_write_text(target, text)
    return target


__all__ = [
    "ResumeChanges", "RunLock", "check_resume_options", "check_run_directory",
    "delete_checkpoints", "resume_changes", "write_resolved_config",
]
