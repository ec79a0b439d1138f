"""The trainer: one run's lifecycle, ``setup() -> train() -> close()``.

``megatron_ift.train`` (the command line) calls the three in that order inside one
``try/finally``; :meth:`Trainer.close` releases everything :meth:`Trainer.setup` took (the run
folder's lock, the metrics writer, the process groups) on every exit path.

* :meth:`~Trainer.setup`: refuse a bad configuration before anything expensive (world size,
  files, hardware), take the run folder, decide fresh start or resume, then build the process
  groups, data, model, optimizer and step and restore a checkpoint.
* :meth:`~Trainer.train`: optimizer steps to ``train.steps``; after each,
  :func:`megatron_ift.training.policy.after_step` says whether to evaluate, save, stop; a
  preemption signal saves and stops at the next step boundary.

Every part of a step, evaluation, save and load reports its progress to the rank's
:class:`~megatron_ift.training.watchdog.Watchdog`, which ends a job that stops making progress
(naming the rank, phase and the peers that went silent, :mod:`megatron_ift.training.heartbeat`);
the ranks' compute-time spread is logged every ``logging.straggler_interval`` steps
(:mod:`megatron_ift.training.stragglers`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Any, Optional

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_ift.checkpoint import layout
from megatron_ift.config_io import dump_yaml, to_dict
from megatron_ift.data import Batch, build_data, check_vocab
from megatron_ift.data.packing import thd_segment_multiple
from megatron_ift.data.tokenizer import load_tokenizer
from megatron_ift.distributed import destroy_distributed, init_distributed, print_rank0, rank, seed_step
from megatron_ift.errors import ConfigError
from megatron_ift.models.fp8 import fp8_transformer_config_kwargs
from megatron_ift.models.fusions import missing_kernel_warnings
from megatron_ift.models.gpt import resolve_transformer_impl
from megatron_ift.platform import Platform
from megatron_ift.training import run_dir
from megatron_ift.training.checkpointing import load_checkpoint, load_pretrained, save_checkpoint
from megatron_ift.training.config import RunConfig
from megatron_ift.training.engine import build_model, build_optimizer, build_scheduler
from megatron_ift.training.logger import MetricsLogger
from megatron_ift.training.policy import after_step
from megatron_ift.training.preemption import Preemption
from megatron_ift.training.preflight import check_platform
from megatron_ift.training.heartbeat import Heartbeat
from megatron_ift.training.step import IFTStep
from megatron_ift.training.step_metrics import StepMetrics
from megatron_ift.training.stragglers import StragglerMonitor
from megatron_ift.training.watchdog import Timeouts, Watchdog


def transformer_overrides(cfg: RunConfig) -> dict[str, Any]:
    """``TransformerConfig`` fields a run sets beyond the architecture: FP8, recomputation."""
    t = cfg.train
    out: dict[str, Any] = fp8_transformer_config_kwargs(cfg.fp8) if cfg.fp8.enabled else {}
    if t.recompute == "selective":
        out["recompute_granularity"] = "selective"
    elif t.recompute == "full":
        out.update(recompute_granularity="full", recompute_method="uniform",
                   recompute_num_layers=t.recompute_num_layers)
    return out


def summary(cfg: RunConfig, dp: int, resume_from: Optional[str], platform: Platform) -> str:
    """The few facts of a run worth a glance (the full resolved config goes to the run folder)."""
    m, p, t, i = cfg.model, cfg.parallel, cfg.train, cfg.ift
    method = "SFT" if i.is_sft else f"IFT ({i.estimator}, lambda {i.max_lambda}, gamma {i.gamma})"
    start = f"resuming {resume_from}" if resume_from and resume_from != "overwrite" else (
        f"from {cfg.checkpoint.pretrained}" if cfg.checkpoint.pretrained else "from scratch")
    return (
        f"megatron-ift train: {method}; model {m.num_layers} layers x {m.hidden_size}, "
        f"{m.num_parameters() / 1e6:.1f}M parameters, {resolve_transformer_impl(m, platform)} "
        f"layer spec; TP {p.tensor_model_parallel_size} "
        f"PP {p.pipeline_model_parallel_size} CP {p.context_parallel_size} DP {dp}; {t.steps} steps of "
        f"{t.global_batch_size} x {cfg.data.seq_length} tokens, lr {cfg.optimizer.lr:g}; "
        f"{start}; on {platform.describe()}; run folder {cfg.checkpoint.dir}"
    )


class Trainer:
    """One training run (one instance per process).

    Args:
        cfg: the run's config.
        platform: where this process computes (:func:`megatron_ift.platform.bootstrap`).
        config_path: the ``--config`` file it came from (never overwritten by the run).
    """

    def __init__(self, cfg: RunConfig, platform: Platform, *, config_path: Optional[str] = None) -> None:
        self.cfg = cfg
        self.platform = platform
        self.config_path = config_path
        self.lock = run_dir.RunLock(cfg.checkpoint.dir)
        self.logger: Optional[MetricsLogger] = None
        self.watchdog = Watchdog(
            Timeouts(step=cfg.train.hang_timeout_s, save=cfg.checkpoint.save_timeout_s,
                     sigterm=cfg.checkpoint.sigterm_timeout_s),
            rank=rank(), run_dir=cfg.checkpoint.dir, peers=self._silent_peers,
        )
        self.heartbeat: Optional[Heartbeat] = None
        self.preemption = Preemption(platform, on_signal=self._preempted)
        self.start_step = 0
        self.resume_from: Optional[str] = None
        self._groups = False

    # -- lifecycle ----------------------------------------------------------------------------

    def setup(self) -> None:
        """Validate, take the run folder, then build everything and restore a checkpoint."""
        cfg = self.cfg
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.dp = cfg.check_world(world)  # before any process group or model exists
        self.num_microbatches = cfg.train.num_microbatches(self.dp)
        cfg.check_paths()
        check_platform(cfg, self.platform)
        # One run per folder: rank 0 holds the lock from before its first look at the folder
        # until close() (the other ranks wait for rank 0 at the first collective).
        if int(os.environ.get("RANK", "0")) == 0:
            self.lock.acquire(break_lock=cfg.checkpoint.break_lock)
        self.resume_from = run_dir.check_run_directory(cfg)
        print_rank0(summary(cfg, self.dp, self.resume_from, self.platform))
        for line in missing_kernel_warnings(self.platform, resolve_transformer_impl(cfg.model, self.platform)):
            print_rank0(f"warning: {line}")

        init_distributed(cfg.parallel, self.platform)
        self._groups = True
        # A peer is reported silent well within the time the watchdog gives a phase.
        stale = min(10.0, max(3.0, self.watchdog.limit("step") / 2))
        self.heartbeat = Heartbeat(rank(), dist.get_world_size(), phase=lambda: self.watchdog.where,
                                   interval_s=stale / 4, stale_s=stale)
        self.heartbeat.start()
        # A gloo group of every rank, for host objects (the straggler gather) next to NCCL.
        everyone = dist.new_group(backend="gloo") if dist.get_world_size() > 1 else None
        self.stragglers = StragglerMonitor(self.platform, cfg.logging.straggler_interval, everyone)
        seed_step(cfg.train.seed, 0, self.platform)
        if self.resume_from == "overwrite":
            if rank() == 0:
                run_dir.delete_checkpoints(cfg.checkpoint.dir)
            dist.barrier()
            self.resume_from = None
        self._build()
        # Watched from here: the data build before (rank 0 tokenises while the others wait) may
        # legitimately take longer than any step.
        self.watchdog.start()
        if self.resume_from:
            with self.watchdog.phase("load", 0, kind="save"):
                self._resume()
        elif cfg.checkpoint.pretrained:
            path = layout.resolve(cfg.checkpoint.pretrained) or cfg.checkpoint.pretrained
            with self.watchdog.phase("load", 0, kind="save"):
                load_pretrained(path, self.chunks)
            print_rank0(f"initialised from pretrained weights {path}")
        self.logger = MetricsLogger(cfg, self.platform, start_step=self.start_step,
                                    rank0=rank() == 0, world_size=dist.get_world_size())
        if rank() == 0:
            os.makedirs(cfg.checkpoint.dir, exist_ok=True)
            written = run_dir.write_resolved_config(cfg.checkpoint.dir, dump_yaml(cfg), self.config_path)
            print(f"resolved config written to {written}", flush=True)
            report = self.data.report
            print(f"data: {report.summary() if hasattr(report, 'summary') else report}", flush=True)

    def train(self) -> int:
        """Train to ``train.steps``; returns the process exit code (0 also when preempted or
        stopped by ``train.exit_after_steps``).

        Raises:
            FloatingPointError: the non-finite policy stopped the run.
        """
        cfg, t = self.cfg, self.cfg.train
        self.preemption.install()
        skipped = 0
        step = self.start_step
        while step < t.steps:
            if self.preemption.agreed():
                self.save(step)
                print_rank0(f"preempted: saved checkpoint at step {step} (signal {self.preemption.signum})")
                return 0
            seed_step(t.seed, step, self.platform)
            start = time.perf_counter()
            with self.watchdog.phase("step", step):
                metrics, grad_norm, updated = self._optimizer_step(step)
            elapsed = time.perf_counter() - start
            self.watchdog.step_done(step, elapsed)
            spread = self.stragglers.step_finished(step + 1)
            if updated:
                skipped = 0
            else:
                skipped += 1
                print_rank0(f"step {step}: non-finite loss ({metrics.loss}) or grad norm ({grad_norm}); "
                            f"update skipped ({skipped} in a row)")
                if t.nonfinite_policy == "stop" or skipped >= t.max_skipped_steps:
                    raise FloatingPointError(
                        f"non-finite loss/gradient at step {step} (train.nonfinite_policy="
                        f"{t.nonfinite_policy}, max_skipped_steps={t.max_skipped_steps})"
                    )
            step += 1
            scale = getattr(self.optimizer, "get_loss_scale", None)
            self.logger.log_step(step, metrics, grad_norm=grad_norm, step_time=elapsed,
                                 lr=self.optimizer.param_groups[0]["lr"],
                                 loss_scale=float(scale()) if scale is not None else None,
                                 spread=spread)
            actions = after_step(cfg, step, start_step=self.start_step, has_eval=self.data.eval is not None)
            if actions.evaluate:
                with self.watchdog.phase("evaluation", step):
                    self.evaluate(step)
            if actions.save:
                self.save(step)
            if actions.stop and not actions.complete:
                print_rank0(f"exit_after_steps: stopped at step {step}; run again to resume")
                return 0
        if rank() == 0:
            run_dir.mark_complete(cfg.checkpoint.dir, t.steps)
        print_rank0(f"done: {t.steps} steps")
        return 0

    def close(self) -> None:
        """Release what :meth:`setup` took: the watchdog and heartbeat threads, the metrics
        writer, the run folder's lock, the process groups. Idempotent; safe after a failed or
        partial setup."""
        self.watchdog.stop()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.logger is not None:
            self.logger.close()
        self.lock.release()
        if self._groups:
            destroy_distributed()
            self._groups = False

    # -- the parts ----------------------------------------------------------------------------

    def evaluate(self, step: int) -> dict[str, float]:
        """SFT and IFT loss on the held-out split (every rank runs the same number of steps)."""
        it = self.data.eval_iterator(dp_rank=self.dp_rank, dp_size=self.dp,
                                     micro_batch_size=self.cfg.train.micro_batch_size,
                                     pin_memory=self.platform.real_cuda)
        # The pipeline schedules take a multiple of the stage count at a time.
        group = max(self.cfg.parallel.pipeline_model_parallel_size, 1)
        limit = self.cfg.train.eval_max_batches or math.inf
        loss = count = sft = sft_count = 0.0
        batch: list[Batch] = []
        seen = 0
        for mb in it:
            batch.append(mb)
            seen += 1
            if len(batch) == group or seen >= limit:
                m = self._eval_group(batch, step, group)
                loss, count, sft, sft_count = loss + m.loss_sum, count + m.count, sft + m.sft_sum, sft_count + m.sft_count
                batch = []
            if seen >= limit:
                break
        if batch:
            m = self._eval_group(batch, step, group)
            loss, count, sft, sft_count = loss + m.loss_sum, count + m.count, sft + m.sft_sum, sft_count + m.sft_count
        result = {"eval/loss": loss / max(count, 1.0), "eval/loss_sft": sft / max(sft_count, 1.0)}
        self.logger.log_eval(step, result)
        return result

    def save(self, step: int) -> None:
        """Save a full checkpoint of step ``step`` (collective)."""
        self.preemption.check_abort()  # a second Ctrl-C means: do not save
        with self.watchdog.phase("save", step, kind="save"):
            self._save(step)
        print_rank0(f"saved checkpoint at step {step} to {self.cfg.checkpoint.dir}")

    def missing_peers(self, wait_s: float = 0.0) -> str:
        """The ranks that went silent (waiting up to ``wait_s`` for their heartbeats to lapse),
        or ""; for the message of a collective that failed because a peer is gone."""
        if self.heartbeat is None:
            return ""
        return self.heartbeat.wait_for_missing(wait_s)

    def _silent_peers(self) -> str:
        return self.heartbeat.missing() if self.heartbeat is not None else ""

    def _preempted(self, signum: int) -> None:
        # Called from the signal handler: SIGTERM / Ctrl-C are followed by a hard kill soon
        # (Slurm's KillWait), the pre-timeout USR1 leaves the time a save needs.
        seconds = (self.cfg.checkpoint.sigterm_timeout_s if signum != signal.SIGUSR1
                   else self.watchdog.limit("save"))
        self.watchdog.deadline(seconds, f"{signal.Signals(signum).name} (save and exit within {seconds:.0f} s)")

    def _save(self, step: int) -> None:
        if self.cfg.parallel.overlap_param_gather:
            # Overlapped parameter gathering leaves the weights of the other data-parallel
            # shards to be gathered at the next forward (megatron DDP's pre-hooks); a checkpoint
            # written before that forward would hold the previous step's values for them.
            # Gather now, as Megatron-LM does before saving.
            for chunk in self.chunks:
                chunk.start_param_sync(force_sync=True)
        save_checkpoint(
            self.cfg.checkpoint.dir, step, self.chunks, self.optimizer, self.scheduler,
            data_state=self.train_iter.state_dict(),
            metadata={"model": to_dict(self.cfg.model), "parallel": to_dict(self.cfg.parallel),
                      "config": to_dict(self.cfg)},
            keep_last=self.cfg.checkpoint.keep_last,
            resumed_from=self.resume_from if step == self.start_step else None,
        )

    def _build(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        # The tokenizer against the model before the (possibly long) data build.
        check_vocab(load_tokenizer(cfg.data.tokenizer_path), cfg.model.vocab_size, cfg.data.tokenizer_path)
        impl = resolve_transformer_impl(cfg.model, self.platform)
        # TE's THD context parallelism splits every packed segment into 2 x cp chunks.
        data_cfg = dataclasses.replace(cfg.data, segment_multiple=thd_segment_multiple(
            cfg.data.segment_multiple, cfg.parallel.context_parallel_size,
            thd=impl == "transformer_engine" and cfg.data.packing))
        # For a resume whose data position no longer fits (the trainer's refusal names the cause).
        self.padding_note = (
            f"; packed samples on the Transformer Engine spec are padded to a multiple of 2 x "
            f"parallel.context_parallel_size tokens under context parallelism (this run: {data_cfg.segment_multiple}), so the rows "
            "change with the context-parallel size"
            if impl == "transformer_engine" and cfg.data.packing else "")
        if data_cfg.segment_multiple != cfg.data.segment_multiple:
            print_rank0(f"packing: every sample padded to a multiple of {data_cfg.segment_multiple} "
                        f"tokens (TE's THD context parallelism splits each packed segment into 2 x "
                        f"{cfg.parallel.context_parallel_size} chunks)")
        self.data = build_data(data_cfg, train_samples=t.steps * t.global_batch_size,
                               eval_samples=max(t.global_batch_size, 1) * 4)
        check_vocab(self.data.tokenizer, cfg.model.vocab_size, cfg.data.tokenizer_path)
        self.chunks, tconfig = build_model(
            cfg.model, cfg.parallel, self.platform,
            mixing_embeddings=cfg.ift.mixing_embeddings, transformer_overrides=transformer_overrides(cfg),
            packed_rows=cfg.data.packing,
        )
        tconfig.finalize_model_grads_func = self.stragglers.wrap_finalize(tconfig.finalize_model_grads_func)
        self.optimizer = build_optimizer(self.chunks, cfg.optimizer, cfg.model, cfg.parallel, tconfig)
        self.scheduler = build_scheduler(self.optimizer, cfg.optimizer, t.steps)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.train_iter = self.data.train_iterator(
            dp_rank=self.dp_rank, dp_size=self.dp, micro_batch_size=t.micro_batch_size,
            num_microbatches=self.num_microbatches, pin_memory=self.platform.real_cuda,
        )
        self.step_fn = IFTStep(
            self.chunks, cfg.ift, cfg.model.vocab_size, seq_length=cfg.data.seq_length,
            micro_batch_size=t.micro_batch_size, platform=self.platform,
            thd=impl == "transformer_engine",
            progress=self.watchdog.progress,
        )

    def _resume(self) -> None:
        cfg = self.cfg
        restored = load_checkpoint(
            self.resume_from, self.chunks, self.optimizer, self.scheduler,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            override_scheduler=cfg.checkpoint.override_scheduler,
        )
        self.start_step = restored.step
        try:
            self.train_iter.load_state_dict(restored.data_state)
        except ValueError as exc:
            raise ConfigError(
                f"resuming {self.resume_from}: the data no longer matches its saved position "
                f"({exc}{self.padding_note}); restore the data.* options or start a new run from it "
                f"(checkpoint.pretrained={self.resume_from} and a new checkpoint.dir)"
            ) from None
        print_rank0(f"resumed from {self.resume_from} at step {self.start_step}")
        for line in run_dir.check_resume_options(self.resume_from, restored.metadata.get("config", {}), cfg):
            print_rank0(line)
        if self.start_step < cfg.train.steps and rank() == 0:
            run_dir.mark_incomplete(cfg.checkpoint.dir)

    def _optimizer_step(self, step: int) -> tuple[StepMetrics, Optional[float], bool]:
        """One optimizer step: (metrics, gradient norm, whether the update was applied)."""
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.watchdog.progress("data")
        batches = [next(self.train_iter) for _ in range(self.num_microbatches)]
        self.stragglers.step_started()
        metrics = self.step_fn(batches, step)
        self.watchdog.progress("optimizer step")
        found_inf = self.optimizer.prepare_grads()  # fp16: unscale and detect overflow
        grad_norm = float("nan") if found_inf else (
            self.optimizer.clip_grad_norm(self.cfg.optimizer.clip_grad)
            if self.cfg.optimizer.clip_grad > 0 else self.optimizer.get_grad_norm()
        )
        finite = math.isfinite(metrics.loss) and grad_norm is not None and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step_with_ready_grads()
        elif found_inf:
            finite = True  # fp16 overflow: the loss scaler already backed off; a normal event
        self.scheduler.step(increment=1)
        return metrics, grad_norm, finite

    def _eval_group(self, batches: list[Batch], step: int, group: int) -> StepMetrics:
        # Pad to a multiple of the pipeline stages with row-free micro-batches (nothing trained).
        batches = batches + [batches[0].without_loss()] * (group - len(batches))
        return self.step_fn(batches, step, forward_only=True)
