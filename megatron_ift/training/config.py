"""RunConfig: everything one training run needs, one frozen dataclass per section."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

from megatron_ift.checkpoint.architecture import (
    check_checkpoint_architecture,
    model_section_from_checkpoint,
    recorded_model,
)
from megatron_ift.checkpoint.layout import CheckpointError
from megatron_ift.config_io import apply_overrides, check_literals, from_dict, load_yaml
from megatron_ift.data.config import DataConfig
from megatron_ift.ift.config import IFTConfig
from megatron_ift.models.config import ModelConfig
from megatron_ift.models.fp8 import FP8Config
from megatron_ift.parallel import ParallelConfig
from megatron_ift.validation import ConfigError, check_positive_int, check_range


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """Optimizer, learning-rate schedule and mixed-precision loss scaling."""

    optimizer: Literal["adam", "sgd"] = "adam"
    """``adam`` (AdamW, decoupled weight decay) or ``sgd``."""
    lr: float = 1e-5
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    weight_decay: float = 0.0
    """Decoupled weight decay (not applied to biases and norms)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    sgd_momentum: float = 0.0
    """SGD momentum."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """``cosine``, ``linear`` or ``constant`` after warm-up."""
    lr_warmup_fraction: float = 0.0
    """Warm-up length as a fraction of the run (the paper's recipe: 0.15)."""
    lr_warmup_steps: int = 0
    """Warm-up length in steps (used when lr_warmup_fraction is 0)."""
    initial_loss_scale: float = 2.0**16
    """fp16 only: initial dynamic loss scale."""
    loss_scale: Optional[float] = None
    """fp16 only: a static loss scale instead of the dynamic one."""

    def __post_init__(self) -> None:
        check_literals(self, "optimizer")
        check_range("optimizer.lr", self.lr, 0.0, low_inclusive=False)
        check_range("optimizer.min_lr", self.min_lr, 0.0, self.lr)
        check_range("optimizer.weight_decay", self.weight_decay, 0.0)
        check_range("optimizer.clip_grad", self.clip_grad, 0.0)
        check_range("optimizer.lr_warmup_fraction", self.lr_warmup_fraction, 0.0, 1.0,
                    high_inclusive=False)
        check_positive_int("optimizer.lr_warmup_steps", self.lr_warmup_steps, allow_zero=True)
        for name in ("adam_beta1", "adam_beta2"):
            check_range(f"optimizer.{name}", getattr(self, name), 0.0, 1.0, high_inclusive=False)


def warmup_steps(optim: OptimizerConfig, total_steps: int) -> int:
    """Warm-up length in steps; raises if it does not fit in the run."""
    if total_steps < 1:
        raise ConfigError(f"train.steps={total_steps} must be >= 1")
    warmup = (
        int(round(optim.lr_warmup_fraction * total_steps))
        if optim.lr_warmup_fraction > 0
        else optim.lr_warmup_steps
    )
    if warmup > 0 and warmup >= total_steps:
        raise ConfigError(
            f"optimizer warm-up ({warmup} steps) must be shorter than train.steps={total_steps}"
        )
    return warmup


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Batch geometry, length of the run and failure policy."""

    steps: int = 100
    """Optimizer steps of the run."""
    micro_batch_size: int = 1
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks (gradient accumulation fills
    the rest: num_microbatches = global / (micro x dp))."""
    seed: int = 1234
    """Seed of initialisation and of per-step RNG (re-seeded from (seed, step) every step)."""
    eval_interval: int = 0
    """Evaluate on the held-out split every N steps (0: never)."""
    eval_max_batches: int = 0
    """Cap on evaluation micro-batches per rank (0: the whole split)."""
    nonfinite_policy: Literal["skip", "stop"] = "skip"
    """A NaN/inf loss or gradient norm: ``skip`` the update (logged) or ``stop`` the run."""
    max_skipped_steps: int = 10
    """``skip`` policy: stop after this many consecutive skipped steps."""
    exit_after_steps: int = 0
    """Stop (saving a checkpoint) after this many steps of *this* invocation, e.g. to fit a
    job's time limit; the next invocation resumes (0: run to ``steps``)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: ``none``, ``selective`` (attention core) or ``full``."""
    recompute_num_layers: int = 1
    """``full`` recomputation: layers per recomputed block (uniform method)."""
    hang_timeout_s: float = 0.0
    """End the job (exit code 7, every thread's stack written) when a rank reports no progress
    for this long during training or evaluation (docs/scale_out.md, "When a job hangs or dies").
    0: derived from the run, 10 x the slowest step measured so far, at least 600 s (30 minutes
    before the first step completes)."""

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch_size", "global_batch_size", "max_skipped_steps",
                     "recompute_num_layers"):
            check_positive_int(f"train.{name}", getattr(self, name))
        check_positive_int("train.eval_interval", self.eval_interval, allow_zero=True)
        check_positive_int("train.eval_max_batches", self.eval_max_batches, allow_zero=True)
        check_positive_int("train.exit_after_steps", self.exit_after_steps, allow_zero=True)
        check_literals(self, "train")
        check_range("train.hang_timeout_s", self.hang_timeout_s, 0.0)
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )

    def num_microbatches(self, dp: int) -> int:
        per_step = self.micro_batch_size * dp
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by "
                f"micro_batch_size x data-parallel size = {self.micro_batch_size} x {dp}"
            )
        return self.global_batch_size // per_step


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Where checkpoints go, how often, and what to start from."""

    dir: str = "runs/default"
    """Run directory: checkpoints, ``latest`` marker, config; resumed from automatically."""
    save_interval: int = 0
    """Save every N steps (0: only at the end and on preemption)."""
    keep_last: int = 2
    """Complete checkpoints kept (older ones are deleted after a newer save completes)."""
    pretrained: Optional[str] = None
    """Model-only start (e.g. ``megatron-ift convert import-hf`` output), used when the run
    directory has no checkpoint yet."""
    overwrite: bool = False
    """Allow starting a *new* run in a directory holding another run's checkpoints (they are
    deleted). Without it such a directory is refused."""
    save_on_exit: bool = True
    """Save when the run ends or is preempted (SIGTERM / SIGUSR1 / SIGINT)."""
    override_scheduler: bool = False
    """On resume, apply this config's learning-rate schedule (``train.steps``, ``optimizer.lr``,
    ...) from the checkpoint's step on instead of refusing a changed one (Megatron-LM's
    ``--override-opt_param-scheduler``)."""
    break_lock: bool = False
    """Take ``<dir>/run.lock`` even if another live run seems to hold it (its holder died on
    another host, say). Never set it while that run is alive."""
    save_timeout_s: float = 0.0
    """End the job (exit code 7) when a checkpoint save or load makes no progress for this long
    (a stuck filesystem or writer process). 0: 4 x the longest save measured so far, at least
    900 s."""
    sigterm_timeout_s: float = 25.0
    """After SIGTERM (Slurm's scancel, time limit or preemption, followed by SIGKILL after its
    KillWait, 30 s by default), the save and exit must be done within this many seconds, else
    the job ends with exit code 7 and the previous complete checkpoint stays ``latest``."""

    def __post_init__(self) -> None:
        if not self.dir:
            raise ConfigError("checkpoint.dir must be set")
        check_range("checkpoint.save_timeout_s", self.save_timeout_s, 0.0)
        check_range("checkpoint.sigterm_timeout_s", self.sigterm_timeout_s, 0.0, low_inclusive=False)
        check_positive_int("checkpoint.save_interval", self.save_interval, allow_zero=True)
        check_positive_int("checkpoint.keep_last", self.keep_last)


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    """What is reported and where."""

    log_interval: int = 1
    """Print a line on rank 0 every N steps."""
    tensorboard: bool = True
    """Write tensorboard scalars under ``<checkpoint.dir>/tensorboard``."""
    progress_bar: bool = True
    """A tqdm bar with ETA on rank 0 (off when stdout is not a terminal)."""
    peak_tflops: float = 989.0
    """Per-GPU dense bf16 peak used for MFU (H100 SXM: 989)."""
    straggler_interval: int = 50
    """Every N steps, gather each rank's compute time per step (up to its gradient
    synchronisation) and log the spread (0: never)."""
    straggler_factor: float = 1.5
    """Name the slowest rank when its compute time exceeds the median by this factor."""

    def __post_init__(self) -> None:
        check_positive_int("logging.log_interval", self.log_interval)
        check_positive_int("logging.straggler_interval", self.straggler_interval, allow_zero=True)
        check_range("logging.straggler_factor", self.straggler_factor, 1.0, low_inclusive=False)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """A training run (``megatron-ift train --config FILE.yaml``)."""

    model: ModelConfig
    data: DataConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    ift: IFTConfig = field(default_factory=IFTConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    fp8: FP8Config = field(default_factory=FP8Config)

    def __post_init__(self) -> None:
        if self.data.seq_length > self.model.max_position_embeddings:
            raise ConfigError(
                f"data.seq_length={self.data.seq_length} exceeds "
                f"model.max_position_embeddings={self.model.max_position_embeddings}"
            )
        warmup_steps(self.optimizer, self.train.steps)
        self.ift.check_vocab(self.model.vocab_size)
        if self.fp8.param_gather and not self.parallel.use_distributed_optimizer:
            raise ConfigError(
                "fp8.param_gather=true needs parallel.use_distributed_optimizer=true: FP8 weights are "
                "gathered by the distributed optimizer from its fp32 shards (Megatron-LM refuses the "
                "combination too); turn the distributed optimizer on or set fp8.param_gather=false")
        self.parallel.check_model(
            self.model.num_layers, self.model.num_attention_heads, self.model.query_groups
        )
        self._check_context_parallel()
        self._check_fp8_shapes()

    def _check_fp8_shapes(self) -> None:
        """Transformer Engine runs a GEMM in FP8 only when the input's leading dimensions (the
        tokens one rank's linear layer sees per micro-batch) multiply to a multiple of 8 and its
        last (the layer's width) is a multiple of 16 (``assert_dim_for_fp8_exec``; it raises at
        the first forward otherwise)."""
        if not self.fp8.enabled:
            return
        par, m = self.parallel, self.model
        tp, cp = par.tensor_model_parallel_size, par.context_parallel_size
        tokens = self.data.seq_length // cp * self.train.micro_batch_size
        if par.sequence_parallel:
            tokens //= tp
        if tokens % 8:
            split = f" / context_parallel_size={cp}" if cp > 1 else ""
            split += f" / tensor_model_parallel_size={tp} (sequence parallel)" if par.sequence_parallel else ""
            raise ConfigError(
                f"fp8.enabled=true: each rank's linear layers see data.seq_length={self.data.seq_length} "
                f"x train.micro_batch_size={self.train.micro_batch_size}{split} = {tokens} tokens, and "
                "Transformer Engine's FP8 GEMMs need a multiple of 8; change data.seq_length (or the "
                "sizes), or set fp8.enabled=false")
        ffn = m.ffn_hidden_size or 4 * m.hidden_size
        for name, width in (("model.hidden_size", m.hidden_size),
                            ("model.ffn_hidden_size / tensor_model_parallel_size", ffn // tp)):
            if width % 16:
                raise ConfigError(f"fp8.enabled=true: {name} = {width} is not a multiple of 16, which "
                                  "Transformer Engine's FP8 GEMMs need; set fp8.enabled=false")

    def _check_context_parallel(self) -> None:
        cp, tp = self.parallel.context_parallel_size, self.parallel.tensor_model_parallel_size
        if cp == 1:
            return
        s = self.data.seq_length
        if s % (2 * cp):
            raise ConfigError(
                f"data.seq_length={s} cannot be split for parallel.context_parallel_size={cp}: the "
                f"load-balanced layout needs a multiple of 2 x {cp} = {2 * cp}; pad it to "
                f"{-(-s // (2 * cp)) * 2 * cp} or change the context-parallel size")
        if self.parallel.sequence_parallel and (s // cp) % tp:
            raise ConfigError(
                f"data.seq_length={s} / parallel.context_parallel_size={cp} = {s // cp} tokens per rank "
                f"is not a multiple of tensor_model_parallel_size={tp}, which sequence parallelism "
                "splits them over; change data.seq_length or the sizes")
        if self.model.attention_backend == "local":
            raise ConfigError(
                "parallel.context_parallel_size > 1 needs model.attention_backend=sdpa (or auto): "
                "megatron-core's own local attention has no context parallelism")
        if self.model.attention_dropout > 0 and self.model.transformer_impl != "transformer_engine":
            raise ConfigError(
                f"model.attention_dropout={self.model.attention_dropout} with "
                "parallel.context_parallel_size > 1: megatron-core seeds the model-parallel dropout "
                "stream per tensor-parallel rank only, so every context-parallel rank would draw the "
                "same attention-dropout masks for its own chunks; set model.attention_dropout=0 "
                "(hidden dropout is unaffected)")

    def check_world(self, world_size: int) -> int:
        """Validate against the number of processes; returns the data-parallel size."""
        dp = self.parallel.data_parallel_size(world_size)
        m = self.train.num_microbatches(dp)
        pp, vpp = self.parallel.pipeline_model_parallel_size, self.parallel.vpp
        if vpp > 1 and m % pp:
            raise ConfigError(
                f"the interleaved pipeline needs num_microbatches ({m} = global_batch_size / "
                f"(micro_batch_size x dp)) to be a multiple of pipeline_model_parallel_size={pp}"
            )
        return dp

    def check_paths(self) -> None:
        """Input files exist (before anything expensive)."""
        for p in self.data.paths:
            if self.data.format == "pretrain":
                for ext in (".bin", ".idx"):
                    if not os.path.exists(p + ext):
                        raise ConfigError(f"data.paths: {p + ext} does not exist")
            elif not os.path.exists(p):
                raise ConfigError(f"data.paths: {p} does not exist")
        if self.data.tokenizer_path and not os.path.isdir(self.data.tokenizer_path):
            raise ConfigError(f"data.tokenizer_path: {self.data.tokenizer_path} is not a folder")
        if self.checkpoint.pretrained:
            if not os.path.exists(self.checkpoint.pretrained):
                raise ConfigError(f"checkpoint.pretrained: {self.checkpoint.pretrained} does not exist")
            try:  # a rope base or norm eps changes no shape: refuse before loading silently
                ckpt, _ = recorded_model(self.checkpoint.pretrained)
                check_checkpoint_architecture(ckpt, self.model)
            except CheckpointError as exc:
                raise ConfigError(f"checkpoint.pretrained: {exc}") from exc


def resolve_model_section(data: dict) -> dict:
    """Fill ``model:`` from ``checkpoint.pretrained``'s recorded architecture, in place.

    With a pretrained start that exists, the recorded architecture is the model; the keys the
    config sets are kept only if they are run-time keys or agree with it (else ConfigError
    naming each). Without one (or when the path is not there yet and ``model:`` is given, as in
    a preset validated before its import exists) the section is used as written.
    """
    pretrained = (data.get("checkpoint") or {}).get("pretrained")
    user = data.get("model")
    if user is not None and not isinstance(user, dict):
        raise ConfigError(f"model must be a mapping of ModelConfig fields, got {user!r}")
    if not pretrained:
        if user is None:
            raise ConfigError("missing required key 'model': set the model: section, or "
                              "checkpoint.pretrained to take the architecture from a checkpoint")
        return data
    if not os.path.exists(pretrained):
        if user is None:
            raise ConfigError(
                f"checkpoint.pretrained: {pretrained} does not exist, and the model "
                "architecture is read from it; import the model first (megatron-ift convert "
                "import-hf HF_DIR OUT) or fix the path"
            )
        return data
    data["model"] = model_section_from_checkpoint(pretrained, user or {})
    return data


def load_run_config(path: str, overrides: Sequence[str] = ()) -> RunConfig:
    """Read ``path`` (YAML), apply ``section.key=value`` overrides, take the model architecture
    from ``checkpoint.pretrained`` when set, validate everything."""
    data = resolve_model_section(apply_overrides(load_yaml(path), overrides))
    return from_dict(RunConfig, data)
