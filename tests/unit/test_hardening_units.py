"""Hardening, in-process pieces: the error hierarchy and CLI reporting, the run lock, the resume
policy, YAML loading, NaN-safe estimators, damaged-checkpoint messages, the error catalogue."""
from __future__ import annotations

import os
import re

import pytest
import torch
from _infra.launch import ROOT

from megatron_ift import errors
from megatron_ift.checkpoint import layout
from megatron_ift.config_io import apply_overrides, load_yaml
from megatron_ift.errors import CheckpointError, ConfigError, ConversionError, DataError
from megatron_ift.ift.config import IFTConfig
from megatron_ift.ift.estimators import estimate
from megatron_ift.training import run_dir


def test_error_types_keep_their_old_import_paths_and_bases():
    from megatron_ift.checkpoint.layout import CheckpointError as C
    from megatron_ift.convert import ConversionError as V
    from megatron_ift.data.errors import DataError as D
    from megatron_ift.validation import ConfigError as K

    assert (C, V, D, K) == (CheckpointError, ConversionError, DataError, ConfigError)
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError)
    assert issubclass(CheckpointError, RuntimeError) and issubclass(ConversionError, RuntimeError)
    codes = [c.exit_code for c in (ConfigError, DataError, CheckpointError, ConversionError,
                                   errors.TrainingDiverged, errors.RankLost, errors.StorageError)]
    assert len(set(codes)) == len(codes) and 1 not in codes and 0 not in codes
    assert errors.RankLost.exit_code == errors.EXIT_NO_PROGRESS == 7  # what the watchdog exits with


@pytest.mark.parametrize("exc", [ConfigError("bad key x"), DataError("f.jsonl:3: bad"),
                                 CheckpointError("ckpt\nbroken"), ConversionError("no")])
def test_run_cli_prints_one_line_with_the_exit_code(exc, capsys, monkeypatch):
    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)

    def body(argv):
        raise exc

    assert errors.run_cli("megatron-ift x", body, []) == type(exc).exit_code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"megatron-ift x: {type(exc).kind}: ")
    # --debug (removed from argv before the body sees it) shows the traceback as well.
    seen = []

    def body2(argv):
        seen.append(argv)
        raise exc

    assert errors.run_cli("megatron-ift x", body2, ["--debug", "a"]) == type(exc).exit_code
    assert seen == [["a"]] and "Traceback" in capsys.readouterr().err


def test_run_cli_lets_internal_errors_through():
    def body(argv):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        errors.run_cli("megatron-ift x", body, [])


def test_preprocess_names_the_line_of_a_non_utf8_byte(tmp_path, capsys, monkeypatch):
    from megatron_ift.data.preprocess import main as preprocess_main

    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)
    src = tmp_path / "t.jsonl"
    lines = [b'{"text": "line %d"}' % i for i in range(1, 121)]
    lines[100] = b'{"text": "bad \xff byte"}'
    src.write_bytes(b"\n".join(lines) + b"\n")
    code = preprocess_main(["--input", str(src), "--output-prefix", str(tmp_path / "o"),
                            "--tokenizer", os.path.join(ROOT, "data", "tokenizer"),
                            "--workers", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == DataError.exit_code, err
    assert f"{src}:101: not UTF-8 text (byte 0xff" in err and "Traceback" not in err
    assert not (tmp_path / "o.bin").exists()


def test_import_of_an_invalid_config_json_is_one_line(tmp_path, capsys):
    from megatron_ift.convert import cli

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    (hf / "model.safetensors").write_bytes(b"")
    code = cli.main(["import-hf", str(hf), str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == ConversionError.exit_code and "Traceback" not in err, err
    assert err.count("\n") == 1 and "not valid JSON" in err


def test_yaml_reads_exponent_floats_and_refuses_duplicate_keys(tmp_path):
    assert apply_overrides({}, ["optimizer.lr=1e-4"]) == {"optimizer": {"lr": 1e-4}}
    p = tmp_path / "c.yaml"
    p.write_text("optimizer:\n  lr: 1e-4\n  min_lr: 1E-5\nmodel:\n  name: 1e4x\n")
    assert load_yaml(str(p)) == {"optimizer": {"lr": 1e-4, "min_lr": 1e-5}, "model": {"name": "1e4x"}}
    p.write_text("optimizer:\n  lr: 1.0e-4\nmodel:\n  num_layers: 2\noptimizer:\n  lr: 2.0\n")
    with pytest.raises(ConfigError, match=r"c.yaml:5: duplicate key 'optimizer' \(first on line 1\)"):
        load_yaml(str(p))
    p.write_text("train:\n  steps: 3\n  steps: 4\n")
    with pytest.raises(ConfigError, match=r"c.yaml:3: duplicate key 'steps' \(first on line 2\)"):
        load_yaml(str(p))


@pytest.mark.parametrize("estimator", ["greedy", "kth", "sample", "top_p"])
def test_estimates_from_non_finite_logits_stay_valid_ids(estimator):
    vocab = 10
    z = torch.randn(3, 5, 16)  # 16 columns: 6 of them vocabulary padding
    z[0, 1, 3] = float("nan")
    z[1] = float("nan")
    z[2, 0] = float("inf")
    z[2, 1, 2] = float("-inf")
    cfg = IFTConfig(estimator=estimator, top_p=0.9 if estimator == "top_p" else None)
    ids = estimate(z, cfg, vocab)
    assert ids.dtype == torch.int64 and ids.shape == (3, 5)
    assert int(ids.min()) >= 0 and int(ids.max()) < vocab, ids
    # finite rows are untouched by the guard
    finite = torch.isfinite(z[..., :vocab]).all(-1)
    ref = estimate(torch.where(finite[..., None], z, torch.zeros_like(z)), cfg, vocab)
    assert torch.equal(ids[finite], ref[finite])


def test_run_lock_refuses_a_file_as_checkpoint_dir(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match=rf"checkpoint.dir={re.escape(str(f))} is a file"):
        run_dir.RunLock(str(f)).acquire()


def test_resume_changes_are_sorted_by_what_they_do():
    old = {"model": {"num_layers": 2, "hidden_dropout": 0.0}, "optimizer": {"lr": 1e-3, "adam_beta1": 0.9},
           "train": {"steps": 6, "exit_after_steps": 0}, "ift": {"max_lambda": 0.2},
           "checkpoint": {"dir": "a"}, "parallel": {"tensor_model_parallel_size": 1}}
    new = {"model": {"num_layers": 2, "hidden_dropout": 0.1}, "optimizer": {"lr": 2e-3, "adam_beta1": 0.8},
           "train": {"steps": 8, "exit_after_steps": 1}, "ift": {"max_lambda": 0.3},
           "checkpoint": {"dir": "b"}, "parallel": {"tensor_model_parallel_size": 2}}
    ch = run_dir.resume_changes(old, new)
    assert ch.architecture == []
    assert ch.schedule == [("optimizer.lr", 1e-3, 2e-3), ("train.steps", 6, 8)]
    assert ch.optimizer_state == [("optimizer.adam_beta1", 0.9, 0.8)]
    assert ch.runtime == [("ift.max_lambda", 0.2, 0.3), ("model.hidden_dropout", 0.0, 0.1)]
    new["model"]["num_layers"] = 3
    assert run_dir.resume_changes(old, new).architecture == [("model.num_layers", 2, 3)]


def test_write_resolved_config_never_overwrites_the_given_config(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    mine = root / "config.yaml"
    mine.write_text("# my file\n")
    assert run_dir.write_resolved_config(str(root), "a: 1\n", str(mine)) == str(root / "config.resolved.yaml")
    assert mine.read_text() == "# my file\n"
    other = tmp_path / "other.yaml"
    other.write_text("x")
    assert run_dir.write_resolved_config(str(root), "a: 2\n", str(other)) == str(mine)
    assert mine.read_text() == "a: 2\n"


def test_damaged_or_foreign_checkpoint_folders_are_named(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is a Hugging Face model folder.*convert import-hf"):
        layout.read_metadata(str(hf))
    root = tmp_path / "run"
    for step in (1, 2, 3):
        d = root / layout.iter_name(step)
        d.mkdir(parents=True)
        for name in ("metadata.json", "common.pt", ".metadata", layout.METADATA):
            (d / name).write_text("{}")
    (root / layout.iter_name(3) / "common.pt").unlink()
    with pytest.raises(CheckpointError, match=r"iter_0000003 is damaged: its common.pt is missing.*"
                       r"Earlier complete checkpoints: iter_0000001, iter_0000002; to resume from "
                       r"iter_0000002, write 'iter_0000002' into .*latest"):
        layout.check_files(str(root / layout.iter_name(3)))
    assert "No earlier complete checkpoint" in layout.earlier_checkpoints_hint(str(root / layout.iter_name(1)))


def test_error_catalogue_lists_existing_classes_and_codes():
    text = open(os.path.join(ROOT, "docs", "errors.md"), encoding="utf-8").read()
    documented = set(re.findall(r"^## (\w+) \(exit (\d+)\)", text, flags=re.M))
    assert documented, "docs/errors.md has no '## Class (exit N)' sections"
    for name, code in documented:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.MegatronIFTError) and cls.exit_code == int(code), name
    assert {n for n, _ in documented} == {
        c.__name__ for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, errors.MegatronIFTError) and c is not errors.MegatronIFTError
    }


def _demo_config(tmp_path, *overrides):
    from megatron_ift.training.config import load_run_config

    return load_run_config(os.path.join(ROOT, "configs", "demo.yaml"),
                           [f"checkpoint.dir={tmp_path / 'run'}", *overrides])


def test_run_directory_refuses_an_imported_checkpoint(tmp_path):
    cfg = _demo_config(tmp_path)
    root = tmp_path / "run"
    ckpt = root / layout.iter_name(0)
    ckpt.mkdir(parents=True)
    layout.write_metadata(str(ckpt), {"step": 0, "model": {}, "hf": {"arch": "llama"}})
    layout.mark_latest(str(root), 0)
    with pytest.raises(ConfigError, match=rf"checkpoint.dir={re.escape(str(root))} holds a "
                       r"model-only checkpoint .* set checkpoint.pretrained=.* and a new checkpoint.dir"):
        run_dir.check_run_directory(cfg)
    assert run_dir.check_run_directory(_demo_config(tmp_path, f"checkpoint.dir={tmp_path / 'new'}")) is None


def test_prune_removes_a_replaced_folder_once_its_step_is_complete_again(tmp_path):
    root = tmp_path / "run"
    for step in (1, 2):
        d = root / layout.iter_name(step)
        d.mkdir(parents=True)
        layout.write_metadata(str(d), {"step": step})
    aside = root / (layout.iter_name(2) + layout.REPLACED_SUFFIX)
    aside.mkdir()
    orphan = root / (layout.iter_name(3) + layout.REPLACED_SUFFIX)  # its step is not complete
    orphan.mkdir()
    layout.mark_latest(str(root), 2)
    layout.prune(str(root), keep_last=2)
    assert not aside.exists() and orphan.exists()
    assert [s for s, _ in layout.list_checkpoints(str(root))] == [1, 2]


def test_a_second_ctrl_c_aborts_even_if_python_drops_its_exception():
    """CI saw the second Ctrl-C's KeyboardInterrupt land in logging's lock release, where Python
    prints and drops it; the run then saved and exited 0. The abort is recorded as well."""
    import signal

    from megatron_ift.platform import Platform
    from megatron_ift.training.preemption import SIGNALS, Preemption

    saved = {s: signal.getsignal(s) for s in SIGNALS}
    try:
        p = Preemption(Platform())
        p.install()
        handler = signal.getsignal(signal.SIGINT)  # what the operating system's signal calls
        p.check_abort()  # nothing yet
        handler(signal.SIGINT, None)
        p.check_abort()  # one Ctrl-C: save at the step boundary, not abort
        assert p.signum == signal.SIGINT and not p.aborted
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)  # the raise that may be dropped
        with pytest.raises(KeyboardInterrupt):
            p.check_abort()  # what save() calls first
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
