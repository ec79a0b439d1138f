"""One FLOP model (megatron_ift.training.metrics) behind the training log's TFLOP/s and MFU and
the planner's step time: what the log reports for a step that took the planner's estimated
compute time is the utilisation the plan assumed."""

import dataclasses
import json

import pytest

from megatron_ift.models.config import ModelConfig
from megatron_ift.planning import Cluster, Layout, Workload
from megatron_ift.planning.planner import step_cost
from megatron_ift.platform import Platform
from megatron_ift.training import metrics
from megatron_ift.training.config import load_run_config
from megatron_ift.training.logger import MetricsLogger
from megatron_ift.training.step_metrics import StepSums


def test_forward_flops_by_hand():
    # 2 layers, h 8, 2 heads of 4, MLP 16 (gelu: 2 GEMMs), vocab 10, untied, no biases
    m = ModelConfig(num_layers=2, hidden_size=8, num_attention_heads=2, vocab_size=10,
                    ffn_hidden_size=16, activation="gelu", normalization="LayerNorm")
    # QKV, proj, MLP and 2 norms per layer; final norm; output layer
    gemm = 2 * (8 * 24 + 8 * 8 + 2 * 8 * 16 + 2 * 8) + 8 + 10 * 8
    attention = 2 * 4 * 5 * 8  # layers x (QK^T + AV: 2 x 2 flops) x seq 5 x heads*head_dim
    assert metrics.forward_flops_per_token(m, 5) == 2 * gemm + attention
    # a tied table is the output layer's weight: counted once, as a GEMM
    tied = dataclasses.replace(m, tie_embeddings=True)
    assert metrics.forward_flops_per_token(tied, 5) == 2 * gemm + attention


@pytest.mark.parametrize("lam,recompute", [(0.2, "none"), (0.0, "none"), (0.2, "full")])
def test_logged_mfu_equals_the_planners_assumption(tmp_path, lam, recompute):
    cfg = load_run_config("configs/demo.yaml", [
        f"checkpoint.dir={tmp_path}", f"train.recompute={recompute}", "logging.peak_tflops=2.0",
        "logging.tensorboard=false", "logging.log_interval=1000",
    ])
    mfu = 0.25
    cluster = Cluster(nodes=1, gpus_per_node=2, peak_tflops=2.0, mfu=mfu)
    workload = Workload(seq_length=cfg.data.seq_length, micro_batch_size=cfg.train.micro_batch_size,
                        global_batch_size=cfg.train.global_batch_size, ift=lam > 0,
                        implementation="local")
    planned = step_cost(cfg.model, cluster, workload, Layout(tp=2, pp=1, dp=1), recompute, 0).compute

    # The trainer's own logging path, for a step that took the planned compute time on one of
    # the cluster's two GPUs' worth of work (the log names the GPU's MFU on a CUDA platform).
    gpu = Platform(kind="emulated_cuda")
    logger = MetricsLogger(cfg, gpu, start_step=0, rank0=True, world_size=1)
    metrics_ = StepSums().reduce((), gpu.device, lam=lam)
    logger.log_step(1, metrics_, grad_norm=0.5, step_time=planned * cluster.world_size, lr=1e-4)
    logger.close()
    logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["tflops_per_gpu"] / cfg.logging.peak_tflops == pytest.approx(mfu, rel=1e-12)
    assert logged["mfu"] == pytest.approx(mfu, rel=1e-12)
    assert logged["tokens_per_second"] == pytest.approx(
        cfg.train.global_batch_size * cfg.data.seq_length / (planned * cluster.world_size))
