"""The training loop: resume, the IFT step, guarded optimizer updates, evaluation, checkpoints,
preemption, logging. ``megatron_ift.train`` is its thin command-line front."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_ift.checkpoint import layout
from megatron_ift.config_io import dump_yaml, to_dict
from megatron_ift.device import compute_device
from megatron_ift.parallel import model_parallel_seed, use_cpu_compat_without_cuda
from megatron_ift.training import metrics, run_dir
from megatron_ift.training.config import RunConfig
from megatron_ift.validation import ConfigError

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class _Preemption:
    """Records SIGTERM / SIGUSR1 / SIGINT; the loop saves and exits at the next step boundary.

    A second Ctrl-C (SIGINT) aborts at once (``KeyboardInterrupt``): the previous complete
    checkpoint stays the one ``latest`` names. Python drops an exception raised where it cannot
    propagate (a finalizer, logging's lock release), so the abort is also recorded and
    :meth:`check_abort` re-raises it before anything is saved."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.aborted = False
        for s in PREEMPT_SIGNALS:
            signal.signal(s, self._handle)

    def _handle(self, signum, _frame) -> None:
        if signum == signal.SIGINT:
            if self.signum == signal.SIGINT:
                self.aborted = True
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            if _rank() == 0:
                print("interrupted: saving a checkpoint at the end of this step "
                      "(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)
        self.signum = signum

    def check_abort(self) -> None:
        """Raise ``KeyboardInterrupt`` if a second Ctrl-C came, even if its first raise was lost."""
        if self.aborted:
            raise KeyboardInterrupt

    def agreed(self) -> bool:
        """True on every rank if any rank was signalled (ranks may get signals at different times).

        The flag is a device tensor: on a GPU the default group is NCCL, which takes no host
        tensors. One host sync per step, at the step boundary.
        """
        flag = torch.tensor(1 if self.signum is not None else 0, device=compute_device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _print(*args) -> None:
    if _rank() == 0:
        print(*args, flush=True)


def _seed_step(seed: int, step: int) -> None:
    """All randomness of a step derives from (seed, step): resume reproduces it exactly."""
    s = (seed * 1_000_003 + step) % (2**31 - 1)
    torch.manual_seed(s)
    model_parallel_seed(s)


def _transformer_overrides(cfg: RunConfig) -> dict[str, Any]:
    from megatron_ift.models.fp8 import fp8_transformer_config_kwargs

    t = cfg.train
    out: dict[str, Any] = fp8_transformer_config_kwargs(cfg.fp8) if cfg.fp8.enabled else {}
    if t.recompute == "selective":
        out["recompute_granularity"] = "selective"
    elif t.recompute == "full":
        out.update(recompute_granularity="full", recompute_method="uniform",
                   recompute_num_layers=t.recompute_num_layers)
    return out


def _metadata(cfg: RunConfig) -> dict[str, Any]:
    return {"model": to_dict(cfg.model), "parallel": to_dict(cfg.parallel), "config": to_dict(cfg)}


def _summary(cfg: RunConfig, dp: int, resume_from: Optional[str]) -> str:
    """The few facts of a run worth a glance (the full resolved config goes to the run folder)."""
    m, p, t, i = cfg.model, cfg.parallel, cfg.train, cfg.ift
    method = "SFT" if i.max_lambda == 0 and i.gamma == 0 else (
        f"IFT ({i.estimator}, lambda {i.max_lambda}, gamma {i.gamma})")
    start = f"resuming {resume_from}" if resume_from and resume_from != "overwrite" else (
        f"from {cfg.checkpoint.pretrained}" if cfg.checkpoint.pretrained else "from scratch")
    return (
        f"megatron-ift train: {method}; model {m.num_layers} layers x {m.hidden_size}, "
        f"{m.num_parameters() / 1e6:.1f}M parameters; TP {p.tensor_model_parallel_size} "
        f"PP {p.pipeline_model_parallel_size} DP {dp}; {t.steps} steps of "
        f"{t.global_batch_size} x {cfg.data.seq_length} tokens, lr {cfg.optimizer.lr:g}; "
        f"{start}; run folder {cfg.checkpoint.dir}"
    )


class Trainer:
    """Builds everything for ``cfg`` and runs it (:meth:`run`). One instance per process.

    Args:
        cfg: the run's config.
        config_path: the ``--config`` file it came from (never overwritten by the run).
    """

    def __init__(self, cfg: RunConfig, config_path: Optional[str] = None) -> None:
        # First: the hardware check below imports megatron-core, which the CPU compatibility
        # layer (or the emulated GPU) must see being imported.
        use_cpu_compat_without_cuda()
        self.cfg = cfg
        self.config_path = config_path
        self._preempt: Optional[_Preemption] = None  # installed by run()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.dp = cfg.check_world(world)  # before any process group or model exists
        self.num_microbatches = cfg.train.num_microbatches(self.dp)
        cfg.check_paths()
        cfg.check_hardware()
        if cfg.ift.estimator == "kth" and cfg.ift.k > cfg.model.vocab_size:
            raise ConfigError(f"ift.k={cfg.ift.k} exceeds model.vocab_size={cfg.model.vocab_size}; "
                              "the kth estimator needs k <= vocabulary size")
        # One run per directory: rank 0 holds the lock from before the first look at the
        # directory until the run ends (other ranks wait for rank 0 at the first collective).
        self.lock = run_dir.RunLock(cfg.checkpoint.dir)
        if int(os.environ.get("RANK", "0")) == 0:
            self.lock.acquire(break_lock=cfg.checkpoint.break_lock)
        try:
            self.resume_from = run_dir.check_run_directory(cfg)
        except BaseException:
            self.lock.release()
            raise

    def release(self) -> None:
        """Release the run directory (idempotent; called when the process is done with it)."""
        self.lock.release()

    def setup(self) -> None:
        from megatron.core import parallel_state

        from megatron_ift.data import build_data, check_vocab
        from megatron_ift.models.gpt import resolve_transformer_impl
        from megatron_ift.data.tokenizer import load_tokenizer
        from megatron_ift.parallel import init_distributed
        from megatron_ift.training.engine import build_model, build_optimizer, build_scheduler
        from megatron_ift.training.step import IFTStep

        cfg = self.cfg
        init_distributed(cfg.parallel)
        _seed_step(cfg.train.seed, 0)
        if self.resume_from == "overwrite":
            if _rank() == 0:
                run_dir.delete_checkpoints(cfg.checkpoint.dir)
            dist.barrier()
            self.resume_from = None
        t = cfg.train
        # The tokenizer against the model before the (possibly long) data build.
        check_vocab(load_tokenizer(cfg.data.tokenizer_path), cfg.model.vocab_size, cfg.data.tokenizer_path)
        self.data = build_data(
            cfg.data,
            train_samples=t.steps * t.global_batch_size,
            eval_samples=max(t.global_batch_size, 1) * 4,
        )
        check_vocab(self.data.tokenizer, cfg.model.vocab_size, cfg.data.tokenizer_path)
        self.chunks, self.tconfig = build_model(
            cfg.model, cfg.parallel,
            mixing_embeddings=cfg.ift.mixing_embeddings,
            transformer_overrides=_transformer_overrides(cfg),
        )
        self.optimizer = build_optimizer(self.chunks, cfg.optimizer, cfg.model, cfg.parallel, self.tconfig)
        self.scheduler = build_scheduler(self.optimizer, cfg.optimizer, t.steps)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.train_iter = self.data.train_iterator(
            dp_rank=self.dp_rank, dp_size=self.dp, micro_batch_size=t.micro_batch_size,
            num_microbatches=self.num_microbatches,
        )
        self.step_fn = IFTStep(
            self.chunks, cfg.ift, cfg.model.vocab_size,
            seq_length=cfg.data.seq_length, micro_batch_size=t.micro_batch_size,
            thd=resolve_transformer_impl(cfg.model) == "transformer_engine",
        )
        self.start_step = 0
        if self.resume_from:
            from megatron_ift.training.checkpointing import load_checkpoint

            state = load_checkpoint(
                self.resume_from, self.chunks, self.optimizer, self.scheduler,
                use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
                override_scheduler=cfg.checkpoint.override_scheduler,
            )
            self.start_step = state["step"]
            try:
                self.train_iter.load_state_dict(state["data"])
            except ValueError as exc:
                raise ConfigError(
                    f"resuming {self.resume_from}: the data no longer matches its saved position "
                    f"({exc}); restore the data.* options or start a new run from it "
                    f"(checkpoint.pretrained={self.resume_from} and a new checkpoint.dir)"
                ) from None
            _print(f"resumed from {self.resume_from} at step {self.start_step}")
            for line in run_dir.check_resume_options(self.resume_from, state["metadata"].get("config", {}), cfg):
                _print(line)
            if self.start_step < t.steps and _rank() == 0:
                run_dir.mark_incomplete(cfg.checkpoint.dir)
        elif cfg.checkpoint.pretrained:
            from megatron_ift.training.checkpointing import load_pretrained

            path = layout.resolve(cfg.checkpoint.pretrained) or cfg.checkpoint.pretrained
            load_pretrained(path, self.chunks)
            _print(f"initialised from pretrained weights {path}")
        self.writer = None
        if _rank() == 0 and cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(cfg.checkpoint.dir, "tensorboard"), purge_step=self.start_step)
        if _rank() == 0:
            os.makedirs(cfg.checkpoint.dir, exist_ok=True)
            written = run_dir.write_resolved_config(cfg.checkpoint.dir, dump_yaml(cfg), self.config_path)
            print(f"resolved config written to {written}", flush=True)
            print(f"data: {self.data.report.summary() if hasattr(self.data.report, 'summary') else self.data.report}", flush=True)

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> int:
        """Train to ``train.steps``; returns the process exit code (0 also when preempted)."""
        cfg = self.cfg
        _print(_summary(cfg, self.dp, self.resume_from))
        self.setup()
        preempt = self._preempt = _Preemption()
        t = cfg.train
        skipped = 0
        bar = self._progress_bar()
        step = self.start_step
        while step < t.steps:
            if preempt.agreed():
                self.save(step)
                _print(f"preempted: saved checkpoint at step {step} (signal {preempt.signum})")
                return 0
            _seed_step(t.seed, step)
            start = time.perf_counter()
            out, grad_norm, updated = self._train_step(step)
            elapsed = time.perf_counter() - start
            if not updated:
                skipped += 1
                _print(f"step {step}: non-finite loss ({out.loss}) or grad norm ({grad_norm}); "
                       f"update skipped ({skipped} in a row)")
                if t.nonfinite_policy == "stop" or skipped >= t.max_skipped_steps:
                    self.close()
                    raise FloatingPointError(
                        f"non-finite loss/gradient at step {step} (train.nonfinite_policy="
                        f"{t.nonfinite_policy}, max_skipped_steps={t.max_skipped_steps})"
                    )
            else:
                skipped = 0
            step += 1
            self._log(step, out, grad_norm, elapsed, bar)
            if t.eval_interval and step % t.eval_interval == 0 and self.data.eval is not None:
                self.evaluate(step)
            if cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0 and step < t.steps:
                self.save(step)
            if t.exit_after_steps and step - self.start_step >= t.exit_after_steps and step < t.steps:
                if not (cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0):
                    self.save(step)
                self.close()
                _print(f"exit_after_steps: stopped at step {step}; run again to resume")
                return 0
        if cfg.checkpoint.save_on_exit and self.start_step < t.steps:
            self.save(t.steps)
        if _rank() == 0:
            run_dir.mark_complete(cfg.checkpoint.dir, t.steps)
        self.close()
        _print(f"done: {t.steps} steps")
        return 0

    def _train_step(self, step: int):
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        mbs = [next(self.train_iter) for _ in range(self.num_microbatches)]
        out = self.step_fn(mbs, step)
        found_inf = self.optimizer.prepare_grads()  # fp16: unscale and detect overflow
        grad_norm = float("nan") if found_inf else (
            self.optimizer.clip_grad_norm(self.cfg.optimizer.clip_grad)
            if self.cfg.optimizer.clip_grad > 0 else self.optimizer.get_grad_norm()
        )
        finite = math.isfinite(out.loss) and grad_norm is not None and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step_with_ready_grads()
        elif found_inf:
            finite = True  # fp16 overflow: the loss scaler already backed off; a normal event
        self.scheduler.step(increment=1)
        return out, grad_norm, finite

    def evaluate(self, step: int) -> dict[str, float]:
        """SFT and IFT loss on the held-out split (every rank runs the same number of steps)."""
        it = self.data.eval_iterator(dp_rank=self.dp_rank, dp_size=self.dp,
                                     micro_batch_size=self.cfg.train.micro_batch_size)
        group = max(self.cfg.parallel.pipeline_model_parallel_size, 1)
        sums = dict(loss=0.0, count=0.0, sft=0.0, sft_count=0.0)
        batch: list = []
        limit = self.cfg.train.eval_max_batches or float("inf")
        seen = 0
        for mb in it:
            batch.append(mb)
            seen += 1
            if len(batch) == group or seen >= limit:
                self._eval_group(batch, step, sums, group)
                batch = []
            if seen >= limit:
                break
        if batch:
            self._eval_group(batch, step, sums, group)
        result = {
            "eval/loss": sums["loss"] / max(sums["count"], 1.0),
            "eval/loss_sft": sums["sft"] / max(sums["sft_count"], 1.0),
        }
        _print(f"eval step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in result.items()))
        if self.writer:
            for k, v in result.items():
                self.writer.add_scalar(k, v, step)
        return result

    def _eval_group(self, batch, step, sums, group) -> None:
        while len(batch) < group:  # pad with a row-free micro-batch (loss_mask 0)
            pad = {k: v.clone() for k, v in batch[0].items()}
            pad["loss_mask"] = torch.zeros_like(pad["loss_mask"])
            batch.append(pad)
        out = self.step_fn(batch, step, forward_only=True)
        m = out.metrics
        sums["loss"] += m["loss_sum"]
        sums["count"] += m["count"]
        sums["sft"] += m["sft_sum"]
        sums["sft_count"] += m["sft_count"]

    def save(self, step: int) -> None:
        from megatron_ift.training.checkpointing import save_checkpoint

        if self._preempt is not None:
            self._preempt.check_abort()  # a second Ctrl-C means: do not save

        save_checkpoint(
            self.cfg.checkpoint.dir, step, self.chunks, self.optimizer, self.scheduler,
            data_state=self.train_iter.state_dict(), metadata=_metadata(self.cfg),
            keep_last=self.cfg.checkpoint.keep_last,
            resumed_from=self.resume_from if step == self.start_step else None,
        )
        _print(f"saved checkpoint at step {step} to {self.cfg.checkpoint.dir}")

    def close(self) -> None:
        if self.writer:
            self.writer.close()
            self.writer = None

    # -- reporting --------------------------------------------------------------------------

    def _progress_bar(self):
        if _rank() != 0 or not self.cfg.logging.progress_bar or not sys.stdout.isatty():
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.train.steps, initial=self.start_step, unit="step", dynamic_ncols=True)

    def _log(self, step: int, out, grad_norm, elapsed: float, bar) -> None:
        cfg = self.cfg
        m = dict(out.metrics)
        rates = metrics.throughput(
            cfg.model, global_batch_size=cfg.train.global_batch_size, seq_length=cfg.data.seq_length,
            seconds=elapsed, world_size=dist.get_world_size() if dist.is_initialized() else 1,
            estimation_pass=m["lambda"] > 0, full_recompute=cfg.train.recompute == "full",
            peak_tflops=cfg.logging.peak_tflops,
        )
        if not torch.cuda.is_available():
            del rates["mfu"]  # a GPU's peak says nothing about a CPU run
        m.update(rates, lr=self.optimizer.param_groups[0]["lr"],
                 grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                 step_time=elapsed, peak_memory_gb=metrics.peak_memory_gb())
        scale = getattr(self.optimizer, "get_loss_scale", None)
        if scale is not None:
            m["loss_scale"] = float(scale())
        if self.writer:
            for k, v in m.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(f"train/{k}", v, step)
        if _rank() == 0:
            with open(os.path.join(cfg.checkpoint.dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **{k: v for k, v in m.items() if isinstance(v, (int, float))}}) + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{out.loss:.4f}", lam=f"{m['lambda']:.3f}")
        if step % cfg.logging.log_interval == 0 or step == cfg.train.steps:
            _print(
                f"step {step}/{cfg.train.steps} loss {out.loss:.4f} loss_sft {m['loss_sft']:.4f} "
                f"lambda {m['lambda']:.3f} est_acc {m['estimate_accuracy']:.3f} lr {m['lr']:.2e} "
                f"grad_norm {m['grad_norm']:.3f} {m['tokens_per_second']:.0f} tok/s "
                f"{elapsed * 1000:.0f} ms"
            )
