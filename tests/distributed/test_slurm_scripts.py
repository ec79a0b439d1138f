"""The sbatch scripts without a cluster: syntax, directives, and the rendered torchrun commands.

A fake allocation (SLURM_* variables) and stub ``srun`` / ``scontrol`` on PATH run the real
batch scripts with ``DRY_RUN=1``: the stub srun runs the step command once per node with that
node's SLURM_NODEID, and the launcher prints the torchrun command it would exec. The test then
checks ranks, world size, node ranks and the rendezvous endpoint of every node.
"""

import os
import re
import shlex
import subprocess
import textwrap

import pytest
from _infra import ROOT

from megatron_ift.planning import Cluster, Workload, get_preset, plan

SLURM = os.path.join(ROOT, "slurm")
SCRIPTS = sorted(f for f in os.listdir(SLURM) if f.endswith((".sbatch", ".sh")))

STUB_SRUN = r"""#!/usr/bin/env bash
# Stub srun: record the options, then run the step command once per node, like one task per node.
printf '%s\n' "$@" > "$STUB_DIR/srun.args"
while [[ $# -gt 0 && $1 == --* ]]; do shift; done
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 SLURM_STEP_ID=0 \
        "$@" > "$STUB_DIR/node$node.cmd" || exit $?
done
if [[ -n "${STUB_SRUN_HANG:-}" ]]; then  # the trainer's watchdog left a stack dump
    sleep 1.1; mkdir -p "$RUN_DIR/hangs"; echo "stacks" > "$RUN_DIR/hangs/rank3-gpu001-77.txt"
fi
exit "${STUB_SRUN_RC:-0}"   # what the training step returns
"""

STUB_SCONTROL = r"""#!/usr/bin/env bash
# Stub scontrol: expand the fake node list; record requeues.
case "$1 $2" in
    "show hostnames") printf '%s\n' $STUB_HOSTS ;;
    *) echo "$*" >> "$STUB_DIR/scontrol.calls" ;;
esac
"""


def test_scripts_parse():
    assert {"cpu_demo.sbatch", "llama3_8b_single_node.sbatch", "llama3_70b_multi_node.sbatch",
            "train_job.sh"} <= set(SCRIPTS)
    for name in SCRIPTS + ["../launch/train_single_node.sh", "../launch/train_multi_node.sh",
                           "../launch/common.sh", "../launch/env.sh", "../.ci/install_slurm.sh"]:
        proc = subprocess.run(["bash", "-n", os.path.join(SLURM, name)], capture_output=True,
                              text=True, timeout=10)
        assert proc.returncode == 0, f"{name}: {proc.stderr}"


@pytest.mark.parametrize("name", [s for s in SCRIPTS if s.endswith(".sbatch")])
def test_sbatch_directives(name):
    text = open(os.path.join(SLURM, name), encoding="utf-8").read()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?\s*$", text, flags=re.M))
    assert re.fullmatch(r"B:USR1@\d+", directives["signal"]), "pre-timeout USR1 to the batch shell"
    assert "requeue" in directives and directives["open-mode"] == "append"
    assert directives["ntasks-per-node"] == "1"
    assert "%j" in directives["output"], "one log per job"
    # No directive line may carry anything sbatch could misread (comments go on their own line).
    for line in re.findall(r"^#SBATCH.*$", text, flags=re.M):
        assert re.fullmatch(r"#SBATCH --[\w-]+(=\S+)?", line), line
    assert "site settings" in text and 'source "${REPO_DIR}/slurm/train_job.sh" "$@"' in text


def _dry_run(tmp_path, script, nnodes, extra_args=(), env_extra=None, expect_rc=0):
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, body in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL)):
        (stubs / name).write_text(body)
        (stubs / name).chmod(0o755)
    config = tmp_path / "model.yaml"
    config.write_text("train:\n  steps: 1\n")
    hosts = [f"gpu{i:03d}" for i in range(1, nnodes + 1)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        PATH=f"{stubs}{os.pathsep}{env['PATH']}", STUB_DIR=str(stubs), STUB_HOSTS=" ".join(hosts),
        DRY_RUN="1", REPO_DIR=ROOT, CONFIG=str(config), RUN_DIR=str(tmp_path / "run"),
        SLURM_JOB_ID="4242", SLURM_JOB_NAME="ift-test", SLURM_NNODES=str(nnodes),
        SLURM_JOB_NODELIST=f"gpu[001-{nnodes:03d}]", SLURM_NODEID="0", SLURM_CPUS_PER_TASK="96",
        SLURM_SUBMIT_DIR=ROOT, **(env_extra or {}))
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(["bash", os.path.join(SLURM, script), *extra_args], env=env,
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == expect_rc, proc.stdout + proc.stderr
    commands = [shlex.split((stubs / f"node{n}.cmd").read_text()) for n in range(nnodes)]
    srun_args = (stubs / "srun.args").read_text().splitlines()
    return proc.stdout, srun_args, commands, hosts, config


def _flags(cmd):
    """torchrun's --key=value flags (up to -m) and the trainer's argv (after the module)."""
    module_at = cmd.index("-m")
    flags = dict(arg[2:].split("=", 1) for arg in cmd[1:module_at] if "=" in arg)
    return flags, cmd[module_at + 1], cmd[module_at + 2:]


def test_70b_script_renders_64_ranks_over_8_nodes(tmp_path):
    out, srun_args, commands, hosts, config = _dry_run(
        tmp_path, "llama3_70b_multi_node.sbatch", 8, extra_args=["train.steps=5"])
    assert {"--nodes=8", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            "--cpus-per-task=96"} <= set(srun_args)
    assert f"--output={tmp_path}/run/logs/%x-%j-run0-node%n.log" in srun_args
    assert "dry run: would requeue" in out

    ranks, world = [], None
    for node, cmd in enumerate(commands):
        flags, module, argv = _flags(cmd)
        assert os.path.basename(cmd[0]) == "torchrun"
        assert (flags["nnodes"], flags["nproc-per-node"], flags["node-rank"]) == ("8", "8", str(node))
        # Static rendezvous on the allocation's first host, port derived from the job id.
        assert (flags["master-addr"], flags["master-port"]) == (hosts[0], str(20000 + 4242 % 20000))
        assert flags["max-restarts"] == "0"
        # Inside a step torchrun must not handle USR1: Slurm signals the workers directly.
        assert "signals-to-handle" not in flags
        assert module == "megatron_ift.train"
        assert argv[:2] == ["--config", str(config)]
        assert argv[-2:] == ["train.steps=5", f"checkpoint.dir={tmp_path}/run"]
        nproc = int(flags["nproc-per-node"])
        world = int(flags["nnodes"]) * nproc
        ranks += [int(flags["node-rank"]) * nproc + local for local in range(nproc)]
    # torchrun's static rendezvous: node r holds global ranks r*nproc ... r*nproc + nproc - 1.
    assert world == 64 and sorted(ranks) == list(range(world))


def test_70b_script_uses_the_planners_layout(tmp_path):
    _, _, commands, _, _ = _dry_run(tmp_path, "llama3_70b_multi_node.sbatch", 8)
    _, _, argv = _flags(commands[0])
    best = plan(get_preset("llama3-70b"), Cluster(nodes=8, gpus_per_node=8),
                Workload(seq_length=4096)).best
    assert [a for a in argv if a.startswith(("parallel.", "train.recompute"))] == best.overrides()


def test_8b_script_renders_one_node(tmp_path):
    _, _, commands, hosts, _ = _dry_run(tmp_path, "llama3_8b_single_node.sbatch", 1)
    flags, _, argv = _flags(commands[0])
    assert (flags["nnodes"], flags["node-rank"], flags["master-addr"]) == ("1", "0", hosts[0])
    assert "parallel.virtual_pipeline_model_parallel_size=4" in argv
    best = plan(get_preset("llama3-8b"), Cluster(nodes=1, gpus_per_node=8),
                Workload(seq_length=4096)).best
    assert [a for a in argv if a.startswith(("parallel.", "train.recompute"))] == best.overrides()


def test_long_context_script_uses_the_planners_context_parallel_layout(tmp_path):
    """32k-token rows on one node: the planner picks context parallelism; the script, its config
    and the plan agree, and the config passes the trainer's checks for that layout."""
    from megatron_ift.training.config import load_run_config

    _, _, commands, _, _ = _dry_run(tmp_path, "llama3_8b_long_context.sbatch", 1)
    _, _, argv = _flags(commands[0])
    best = plan(get_preset("llama3-8b"), Cluster(nodes=1, gpus_per_node=8),
                Workload(seq_length=32768)).best
    assert best.layout.cp > 1
    overrides = [a for a in argv if a.startswith(("parallel.", "train.recompute"))]
    assert overrides == best.overrides()
    text = open(os.path.join(SLURM, "llama3_8b_long_context.sbatch"), encoding="utf-8").read()
    assert 'CONFIG="${CONFIG:-configs/llama3_8b_ift_32k.yaml}"' in text  # (the dry run sets its own)
    cfg = load_run_config(os.path.join(ROOT, "configs", "llama3_8b_ift_32k.yaml"), overrides)
    assert cfg.data.seq_length == 32768 and cfg.parallel.context_parallel_size == best.layout.cp
    assert cfg.check_world(8) == best.layout.dp
    # the config's own parallel section is the same layout (launching it by hand agrees)
    assert load_run_config(os.path.join(ROOT, "configs", "llama3_8b_ift_32k.yaml"), []).parallel == cfg.parallel


@pytest.mark.parametrize("retry", ["0", "1"])
def test_failed_step_is_requeued_only_when_asked(tmp_path, retry):
    # A crash (non-zero exit, no pre-timeout signal) must not requeue by default: a config error
    # or a bug would loop. REQUEUE_ON_FAILURE=1 retries it from the last checkpoint.
    out, *_ = _dry_run(tmp_path, "cpu_demo.sbatch", 1, expect_rc=0 if retry == "1" else 3,
                       env_extra=dict(STUB_SRUN_RC="3", REQUEUE_ON_FAILURE=retry))
    assert "training step exited with status 3" in out
    if retry == "1":
        assert "dry run: would requeue" in out
    else:
        assert "training failed (status 3" in out and "would requeue" not in out


@pytest.mark.parametrize("fresh", [True, False])
def test_a_step_that_could_not_make_progress_is_requeued(tmp_path, fresh):
    """The watchdog (or a lost rank) ends the step with a stack dump in RUN_DIR/hangs: requeue,
    the next run resumes from latest. A dump left by an earlier run does not count."""
    if not fresh:
        (tmp_path / "run" / "hangs").mkdir(parents=True)
        (tmp_path / "run" / "hangs" / "rank0-old-1.txt").write_text("an earlier run's")
    out, *_ = _dry_run(tmp_path, "cpu_demo.sbatch", 1, expect_rc=0 if fresh else 1,
                       env_extra=dict(STUB_SRUN_RC="1", **({"STUB_SRUN_HANG": "1"} if fresh else {})))
    if fresh:
        assert "could not make progress" in out and "dry run: would requeue" in out
    else:
        assert "training failed (status 1" in out and "would requeue" not in out


def test_missing_config_fails_before_srun(tmp_path):
    stubs = tmp_path / "stubs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(REPO_DIR=ROOT, CONFIG="configs/does_not_exist.yaml", RUN_DIR=str(tmp_path),
               SLURM_JOB_ID="7", SLURM_NNODES="1", SLURM_JOB_NODELIST="n1", DRY_RUN="1",
               PATH=f"{stubs}{os.pathsep}{env['PATH']}")
    proc = subprocess.run(["bash", os.path.join(SLURM, "cpu_demo.sbatch")], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "config 'configs/does_not_exist.yaml' not found" in proc.stdout + proc.stderr


def test_runtime_environment_defaults_and_overrides():
    script = textwrap.dedent(f"""
        source {ROOT}/launch/env.sh
        echo "$CUDA_DEVICE_MAX_CONNECTIONS $TORCH_NCCL_ASYNC_ERROR_HANDLING $NCCL_IB_TIMEOUT"
    """)
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_DEVICE_MAX_CONNECTIONS", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
                        "NCCL_IB_TIMEOUT")}
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                         timeout=10).stdout.split()
    assert out == ["1", "3", "22"]
    env["NCCL_IB_TIMEOUT"] = "20"  # a site's value wins over the default
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                         timeout=10).stdout.split()
    assert out[2] == "20"
