"""The command line as users meet it: every --help prints, refusals are one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rerankd.cli import build_parser, main
from tests.harness import offline_env


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for command in _subcommands():
        assert command in out


@pytest.mark.parametrize("command", _subcommands())
def test_every_subcommand_help_prints_and_exits_0(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "usage: rerankd " + command in out
    if command == "serve":
        assert "--compile" in out and "22% faster" in out  # the % that used to crash it


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--api-key-file", "{empty}"], {}, "holds no key"),
        (["--api-key", ""], {}, "--api-key is empty"),
        ([], {"RERANKD_API_KEY": ","}, "RERANKD_API_KEY"),
        (["--rerank-document-format", "xml"], {}, "use object or string"),
    ],
)
def test_serve_refuses_an_empty_key_set_in_one_line(tmp_path, args, env, message):
    empty = tmp_path / "keys"
    empty.write_text("# only a comment\n\n   \n", encoding="utf-8")
    args = [a.replace("{empty}", str(empty)) for a in args]
    proc = subprocess.run(
        [sys.executable, "-m", "rerankd.cli", "serve", "--model", str(tmp_path / "none"), *args],
        env=offline_env(env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert message in lines[0], proc.stderr


def test_ray_flags_have_environment_variables_like_every_other_flag(monkeypatch):
    from rerankd.settings import settings_from_args

    monkeypatch.setenv("RERANKD_REPLICAS", "3")
    monkeypatch.setenv("RERANKD_NUM_GPUS_PER_REPLICA", "0.5")
    args = build_parser().parse_args(["serve", "--ray"])
    settings = settings_from_args(args)
    assert (settings.ray, settings.replicas, settings.num_gpus_per_replica) == (True, 3, 0.5)
    args = build_parser().parse_args(["rerank", "--input", "i", "--output", "o", "--replicas", "2"])
    assert settings_from_args(args).replicas == 2


def test_rerank_and_eval_take_the_engine_flags_from_settings(monkeypatch):
    from rerankd.cli import _local_settings

    monkeypatch.setenv("RERANKD_DTYPE", "float32")
    args = build_parser().parse_args(["eval", "--dataset", "d", "--quantize", "int8"])
    settings = _local_settings(args)
    assert (settings.dtype, settings.quantize, settings.api_key) == ("float32", "int8", [])


def test_a_bad_environment_value_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setenv("RERANKD_PORT", "eighty")
    assert main(["serve", "--help"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "RERANKD_PORT" in err
