"""The command line: help texts, config errors, exit codes, python -m."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import EXIT_USAGE, _summarise, build_parser, main

SUBCOMMANDS = ("ingest", "preprocess", "train", "infer", "evaluate", "report", "run", "demo")


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert f"  {name}" in text
    assert "Exit status" in text


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([name, "--help"])
    assert "--out" in capsys.readouterr().out


def test_config_error_exits_2_with_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("trian:\n  epochs: 1\n")
    code = main(["run", str(cfg), "--out", str(tmp_path / "run")])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "trian" in err and "Did you mean 'train'" in err


def test_run_without_data_root_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "run")]) == EXIT_USAGE
    assert "data.root is not set" in capsys.readouterr().err


def test_unknown_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "r"), "--stages", "ingest,trian"]) == EXIT_USAGE
    assert "trian" in capsys.readouterr().err


def test_python_dash_m_works() -> None:
    result = subprocess.run([sys.executable, "-m", "pipeline", "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("medpipe ")


def test_parser_requires_out() -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["preprocess", "somewhere"])
    assert info.value.code == 2  # ingest checks --out itself: --dry-run needs none (tests/stages/test_ingest_survey.py)


@pytest.mark.parametrize("command", ["run", "train"])
def test_fold_option_reaches_the_config(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--fold sets train.fold (checked against train.num_folds), for `run` and `train` alike."""
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  num_folds: 3\n")
    target = [str(config)] if command == "run" else [str(tmp_path), "--config", str(config)]
    assert main([command, *target, "--out", str(tmp_path / "o"), "--fold", "3"]) == EXIT_USAGE
    assert "fold 3 does not exist with num_folds 3" in capsys.readouterr().err


def test_the_console_entry_exits_quickly_with_main_s_code_and_flushed_logs(tmp_path: Path) -> None:
    """`python -m pipeline` ends with os._exit after the exit handlers: codes and log files must survive that."""
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    failed = subprocess.run([sys.executable, "-m", "pipeline", "ingest", str(junk), "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and "no_studies" in failed.stderr
    assert "To resume after fixing this, run: medpipe ingest" in failed.stderr
    log = (out / "medpipe.log").read_text()
    assert log and log.endswith("\n")  # written through a handler that the quick exit flushed and closed
    usage = subprocess.run([sys.executable, "-m", "pipeline", "ingest", "--no-such-option"], capture_output=True,
                           text=True, timeout=120)
    assert usage.returncode == EXIT_USAGE
    helped = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "ingest" in helped.stdout


def test_the_forkserver_exit_hook_does_nothing_outside_the_forkserver() -> None:
    code = "import sys, pipeline.forkserver_exit; sys.exit(7)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 7


def test_studies_that_failed_alike_are_one_line_naming_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    alike = {"status": "failed", "code": "nifti_corrupt", "message": "bold.nii.gz: the gzip stream ends early"}
    studies = [{"id": f"case_{n}", **alike} for n in range(5)]
    studies.insert(2, {"id": "case_x", "status": "failed", "code": "too_large", "message": "ct.nii.gz: too large"})
    studies.append({"id": "case_ok", "status": "ok"})
    _summarise("ingest", {"status": "partial", "counts": {"ok": 1, "failed": 6}, "studies": studies}, tmp_path)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == [
        "  failed 5 studies (case_0, case_1, case_2, ...): [nifti_corrupt] bold.nii.gz: the gzip stream ends early",
        "  failed case_x: [too_large] ct.nii.gz: too large"]
