"""Settings: every flag has an environment variable; flags win; types are checked."""

from __future__ import annotations

from dataclasses import fields

import pytest

from rerankd.settings import DEFAULT_MODEL, Settings, SettingsError, parse_settings


def test_defaults():
    s = parse_settings([], env={})
    assert s.model == DEFAULT_MODEL and s.port == 8000 and s.api_key == [] and s.access_log is True
    assert s.max_documents == 10_000 and s.request_timeout == 300.0


def test_every_field_reads_its_environment_variable():
    env = {
        "RERANKD_MODEL": "/models/x",
        "RERANKD_PORT": "9001",
        "RERANKD_API_KEY": "a, b",
        "RERANKD_MAX_MODEL_LEN": "1024",
        "RERANKD_REQUEST_TIMEOUT": "2.5",
        "RERANKD_ACCESS_LOG": "false",
        "RERANKD_CORS_ORIGIN": "https://x.example",
    }
    s = parse_settings([], env=env)
    assert (s.model, s.port, s.api_key, s.max_model_len) == ("/models/x", 9001, ["a", "b"], 1024)
    assert (
        s.request_timeout == 2.5
        and s.access_log is False
        and s.cors_origin == ["https://x.example"]
    )


def test_flags_beat_environment_and_lists_repeat():
    env = {"RERANKD_PORT": "9001", "RERANKD_API_KEY": "env-key"}
    s = parse_settings(
        ["--port", "7000", "--api-key", "k1", "--api-key", "k2", "--no-access-log"], env=env
    )
    assert s.port == 7000 and s.api_key == ["k1", "k2"] and s.access_log is False


def test_bad_environment_values_fail_with_the_variable_name():
    with pytest.raises(SettingsError, match="RERANKD_PORT"):
        parse_settings([], env={"RERANKD_PORT": "eighty"})
    with pytest.raises(SettingsError, match="RERANKD_ACCESS_LOG"):
        parse_settings([], env={"RERANKD_ACCESS_LOG": "maybe"})


def test_every_field_has_help():
    assert all(f.metadata.get("help") for f in fields(Settings))


def test_api_key_file_adds_keys(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# team keys\nfile-key-1\n\n  file-key-2  \n")
    s = parse_settings(["--api-key", "flag-key", "--api-key-file", str(path)], env={})
    assert s.all_api_keys() == ["flag-key", "file-key-1", "file-key-2"]


def test_models_split_into_one_settings_per_model():
    s = parse_settings(
        [
            "--models",
            "qwen=Qwen/Qwen3-Reranker-0.6B",
            "--models",
            "./ckpt/x=y",
            "--dtype",
            "float32",
        ],
        env={},
    )
    one, two = s.per_model()
    assert (one.model, one.served_model_name, one.models) == (
        "Qwen/Qwen3-Reranker-0.6B",
        ["qwen"],
        [],
    )
    assert (two.model, two.served_model_name) == ("./ckpt/x=y", [])  # a path, not NAME=
    assert one.dtype == two.dtype == "float32"  # every other setting is shared
    env = parse_settings([], env={"RERANKD_MODELS": "a=/m/a, /m/b"})
    assert [m.model for m in env.per_model()] == ["/m/a", "/m/b"]
    single = parse_settings(["--model", "/m/c"], env={})
    assert single.per_model() == [single]


def test_bad_models_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="repeated"):
        parse_settings(["--models", "a=/m/1", "--models", "a=/m/2"], env={}).per_model()
    with pytest.raises(ValueError, match="NAME=SOURCE"):
        parse_settings(["--models", "/m/1", "--served-model-name", "x"], env={}).per_model()
    with pytest.raises(ValueError, match="no model after"):
        parse_settings(["--models", "a="], env={}).per_model()


def test_serve_refuses_bad_models_before_loading_anything(capsys):
    from rerankd.cli import main

    assert main(["serve", "--models", "a=/m/1", "--models", "a=/m/2"]) == 2
    assert "each model needs its own name" in capsys.readouterr().err
