"""Find a checkpoint on disk: a local directory as is, a hub id through huggingface_hub.

Download failures become one clear `ModelLoadError` paragraph (what failed, how to fix it,
how to pass a local directory) instead of a traceback. A checkpoint our own model code does
not cover raises `UnsupportedCheckpoint` while it is read (configs, tensor layout).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from rerankd.errors import ModelLoadError

log = logging.getLogger(__name__)

#: what a reranker needs from a repo: configs, tokenizer files and safetensors weights
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


class UnsupportedCheckpoint(Exception):
    """Our own model code does not cover this checkpoint; use the transformers engine."""


def _looks_like_path(model: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else is meant as a filesystem path."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1


def resolve_model_dir(model: str, revision: str | None = None) -> Path:
    """Return a local directory holding `model` (downloading a hub id if needed)."""
    path = Path(model).expanduser()
    if path.is_dir():
        _check_checkpoint_dir(path, model)
        return path
    if path.exists() or _looks_like_path(model):
        raise ModelLoadError(
            f"model {model!r} is not a directory. Pass a checkpoint directory (with "
            "config.json, tokenizer files and *.safetensors) or a Hugging Face hub id such as "
            "Qwen/Qwen3-Reranker-0.6B."
        )
    try:
        from huggingface_hub import snapshot_download

        local = Path(
            snapshot_download(repo_id=model, revision=revision, allow_patterns=ALLOW_PATTERNS)
        )
    except Exception as exc:  # any hub failure ends in the same advice
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}"
        hint = (
            "HF_HUB_OFFLINE is set and the model is not in the local cache (HF_HOME)."
            if offline
            else "Check the id, your network access to the Hugging Face hub, and HF_TOKEN for "
            "gated or private models."
        )
        raise ModelLoadError(
            f"could not download model {model!r} from the Hugging Face hub ({reason}). {hint} "
            "To serve a model without the hub, download it elsewhere (e.g. `huggingface-cli "
            "download ID --local-dir DIR`), copy the directory here and start with "
            "`rerankd serve --model /path/to/DIR`."
        ) from exc
    _check_checkpoint_dir(local, model)
    return local


def _check_checkpoint_dir(path: Path, model: str) -> None:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model directory {str(path)!r} (from {model!r}) has no config.json")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelLoadError(
            f"model directory {str(path)!r} (from {model!r}) has no weights (*.safetensors)"
        )


def load_config_and_tokenizer(path: Path):
    """Load the transformers config and tokenizer of a checkpoint directory."""
    from transformers import AutoTokenizer

    try:
        config = _load_config(path)
        # the config in hand: AutoTokenizer would otherwise load it again, remote code and all
        tokenizer = AutoTokenizer.from_pretrained(path, config=config)
    except Exception as exc:
        raise ModelLoadError(
            f"could not load the config/tokenizer in {str(path)!r}: {type(exc).__name__}: {exc}"
        ) from exc
    return config, tokenizer


def _load_config(path: Path):
    """The checkpoint's config. One that ships its own config code (`auto_map`) for a model
    type transformers does not know (bge-reranker-v2-minicpm-layerwise's "minicpm") is read as
    plain values: rerankd never runs a checkpoint's code, and AutoConfig would ask whether to
    (an interactive prompt, then an error)."""
    from transformers import AutoConfig, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    data = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    remote = "AutoConfig" in (data.get("auto_map") or {})
    if remote and data.get("model_type") not in CONFIG_MAPPING_NAMES:
        config = PretrainedConfig.from_dict(data)
        config._name_or_path = str(path)
        return config
    return AutoConfig.from_pretrained(path)
