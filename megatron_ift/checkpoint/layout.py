"""Run-directory layout shared by training and conversion.

::

    <root>/
      latest                 # text: name of the newest *complete* checkpoint, e.g. iter_0000100
      iter_0000100/          # a megatron-core dist_checkpointing directory
        megatron_ift.json    # step, model config, run config (written after the save completes)
        ...                  # dist_checkpointing files
      COMPLETED              # written by the trainer when the run reached its last step

``latest`` is replaced atomically (write to a temporary file, fsync, ``os.replace``) and only
after every rank finished writing, so a crash in the middle of a save leaves the previous
checkpoint loadable and ``latest`` pointing to it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Optional

from megatron_ift.errors import CheckpointError

LATEST = "latest"
COMPLETED = "COMPLETED"
METADATA = "megatron_ift.json"
REPLACED_SUFFIX = ".replaced"  # an older folder of the step being saved, until the save commits
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new content, never half."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_metadata(ckpt_dir: str, metadata: dict[str, Any]) -> None:
    atomic_write_text(os.path.join(ckpt_dir, METADATA), json.dumps(metadata, indent=2, sort_keys=True))


def is_hf_folder(path: str) -> bool:
    """Whether ``path`` looks like a Hugging Face model folder (config.json and weights)."""
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        return False
    return any(n.endswith((".safetensors", ".bin")) or n.endswith(".safetensors.index.json")
               for n in os.listdir(path))


def earlier_checkpoints_hint(ckpt_dir: str) -> str:
    """A sentence naming the complete checkpoints older than ``ckpt_dir`` in its run folder and
    how to resume from the newest of them (empty when there is none)."""
    root = os.path.dirname(os.path.abspath(ckpt_dir))
    m = _ITER_RE.match(os.path.basename(os.path.abspath(ckpt_dir)))
    if not m:
        return ""
    older = [(s, p) for s, p in list_checkpoints(root) if s < int(m.group(1))]
    if not older:
        return " No earlier complete checkpoint exists in that run folder."
    names = ", ".join(os.path.basename(p) for _, p in older)
    newest = os.path.basename(older[-1][1])
    return (f" Earlier complete checkpoints: {names}; to resume from {newest}, write "
            f"'{newest}' into {os.path.join(root, LATEST)} (and move the damaged folder away).")


def check_files(ckpt_dir: str) -> None:
    """Raise if ``ckpt_dir`` lacks one of dist_checkpointing's own files (a damaged copy)."""
    for name in ("metadata.json", "common.pt", ".metadata"):
        if not os.path.isfile(os.path.join(ckpt_dir, name)):
            raise CheckpointError(
                f"{ckpt_dir} is damaged: its {name} is missing (deleted or partly copied)."
                + earlier_checkpoints_hint(ckpt_dir)
            )


def read_metadata(ckpt_dir: str) -> dict[str, Any]:
    path = os.path.join(ckpt_dir, METADATA)
    if not os.path.isfile(path):
        if is_hf_folder(ckpt_dir):
            raise CheckpointError(
                f"{ckpt_dir} is a Hugging Face model folder, not a megatron-ift checkpoint: run "
                f"'megatron-ift convert import-hf {ckpt_dir} OUT_DIR' first and point to OUT_DIR"
            )
        if not os.path.isdir(ckpt_dir):
            raise CheckpointError(f"checkpoint {ckpt_dir} does not exist")
        raise CheckpointError(
            f"{ckpt_dir} is not a complete megatron-ift checkpoint ({METADATA} missing): it was "
            "interrupted during its save or is not a checkpoint; point to an earlier iter_* folder"
        )
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is corrupt ({exc}); use an earlier checkpoint") from exc


def mark_latest(root: str, step: int) -> None:
    """Point ``<root>/latest`` at ``iter_<step>`` (call once the save is complete everywhere)."""
    atomic_write_text(os.path.join(root, LATEST), iter_name(step) + "\n")


def resolve_name(root: str) -> Optional[str]:
    """The folder name ``<root>/latest`` holds, or None without a readable ``latest``."""
    try:
        with open(os.path.join(root, LATEST), encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def resolve(path: str) -> Optional[str]:
    """The checkpoint directory ``path`` designates: an ``iter_*`` folder, or a run root whose
    ``latest`` names one. None for a root without checkpoints."""
    if os.path.isfile(os.path.join(path, METADATA)):
        return path
    latest = os.path.join(path, LATEST)
    if not os.path.isfile(latest):
        return None
    with open(latest, encoding="utf-8") as f:
        name = f.read().strip()
    target = os.path.join(path, name)
    if not _ITER_RE.match(name) or not os.path.isdir(target):
        raise CheckpointError(
            f"{latest} names {name!r}, which is not a checkpoint folder in {path}; "
            "fix or delete the 'latest' file to resume from another checkpoint"
        )
    read_metadata(target)
    return target


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of complete checkpoints under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _ITER_RE.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, METADATA)):
            out.append((int(m.group(1)), path))
    return sorted(out)


def prune(root: str, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints (never the one in latest),
    incomplete ``iter_*`` folders older than the newest complete one, and ``iter_*.replaced``
    folders whose step has a complete checkpoint again."""
    complete = list_checkpoints(root)
    if not complete:
        return []
    latest = resolve(root)
    newest_step = complete[-1][0]
    removed = []
    doomed = [p for _, p in complete[:-keep_last]] if keep_last > 0 else []
    for name in os.listdir(root):
        m = _ITER_RE.match(name)
        path = os.path.join(root, name)
        if m and not os.path.isfile(os.path.join(path, METADATA)) and int(m.group(1)) < newest_step:
            doomed.append(path)
        elif name.endswith(REPLACED_SUFFIX) and os.path.isfile(
            os.path.join(root, name[: -len(REPLACED_SUFFIX)], METADATA)
        ):
            doomed.append(path)  # set aside by a save interrupted before it could delete it
    for path in doomed:
        if latest is not None and os.path.abspath(path) == os.path.abspath(latest):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
