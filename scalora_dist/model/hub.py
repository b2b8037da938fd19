"""Where a model comes from: a local checkpoint directory or a Hugging Face hub repo id.

`model.path` is tried as a local directory first (relative paths against the working
directory). Anything else that is a valid repo id (`org/name`) is resolved by
huggingface_hub: downloaded on a connected machine (HF_TOKEN, HF_HOME and a revision are
honoured by huggingface_hub itself), read from its cache when offline (HF_HUB_OFFLINE=1).
Only what training reads is fetched: configs, safetensors weights and tokenizer files.
"""

from __future__ import annotations

import os
from pathlib import Path

from scalora_dist.config import ConfigError, ModelConfig

# What training and the merged export read; never *.bin / *.pth / GGUF copies of the weights.
ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer*",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
]


def is_local(path: str) -> bool:
    return Path(path).expanduser().exists()


def model_reference(cfg: ModelConfig) -> str:
    """What to record as the base model of an exported adapter: the hub id, or the local
    directory as an absolute path (a relative one breaks as soon as the user changes
    directory)."""
    if is_local(cfg.path):
        return str(Path(cfg.path).expanduser().resolve())
    return cfg.path


def resolve_model_dir(cfg: ModelConfig, *, local_files_only: bool = False) -> Path:
    """The local directory holding the checkpoint of `cfg.path` (downloading a hub id if
    needed and allowed). Raises ConfigError naming the path or id and what to do."""
    local = Path(cfg.path).expanduser()
    if local.exists():
        return _check_checkpoint_dir(local, cfg.path)
    if local.is_absolute() or cfg.path.startswith((".", "~")) or not _valid_repo_id(cfg.path):
        raise ConfigError(
            f"model.path: {cfg.path!r} is not a directory (looked for {local.resolve()}); give a "
            "transformers checkpoint directory or a hub model id such as org/name (for a demo "
            "model run `scalora-dist make-tiny-model`)"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    revision = cfg.revision or None
    where = f"{cfg.path!r}" + (f" at revision {revision!r}" if revision else "")
    download = f"hf download {cfg.path}" + (f" --revision {revision}" if revision else "")
    try:
        snapshot = snapshot_download(
            cfg.path,
            revision=revision,
            allow_patterns=ALLOW_PATTERNS,
            local_files_only=local_files_only,
        )
    except LocalEntryNotFoundError:
        reason = unreachable_hub_reason()
        raise ConfigError(
            f"model.path: {where} is not a local directory (looked for {local.resolve()}) and "
            f"is not in the Hugging Face cache ({_hub_cache()}), and {reason}; download it on a "
            f"connected machine with `{download}` (with the same HF_HOME), or give a local "
            "checkpoint directory"
        ) from None
    except GatedRepoError:
        raise ConfigError(
            f"model.path: {where} is a gated repository: accept its licence on the hub and set "
            "HF_TOKEN (or run `hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise ConfigError(
            f"model.path: {where} is neither a local directory (looked for {local.resolve()}) "
            "nor a model on the hub you can access (private repos need HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise ConfigError(f"model.revision: {revision!r} does not exist in {cfg.path!r}") from None
    return _check_checkpoint_dir(Path(snapshot), cfg.path)


def _check_checkpoint_dir(model_dir: Path, spec: str) -> Path:
    if not model_dir.is_dir():
        raise ConfigError(f"model.path: {spec!r} ({model_dir.resolve()}) is not a directory")
    if not (model_dir / "config.json").is_file():
        raise ConfigError(
            f"model.path: {spec!r} ({model_dir.resolve()}) has no config.json (not a transformers checkpoint)"
        )
    return model_dir


def _valid_repo_id(spec: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def unreachable_hub_reason() -> str:
    """Why a file that is not in the cache could not be fetched, for error messages."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    return "the hub is switched off (HF_HUB_OFFLINE=1)" if offline else "the hub cannot be reached"
