"""Finding and loading models and tokenizers: the catalog of packaged models, Hugging Face folders, hub ids.

The catalog ships real small models that come inside registry packages (shared/assets.md), since the
Hugging Face Hub cannot be reached from the machines this runs on. The first use of a catalog entry
converts its GGUF once into a cached folder under ``cache_dir``; later loads read the cache.

Nothing here reads environment variables: callers (the CLI, the worker) pass ``cache_dir``.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ctpd_core.alignment import require_offsets
from ctpd_core.catalog import CATALOG, ModelLoadError, catalog_gguf_path
from ctpd_core.publish import publish_folder

logger = logging.getLogger(__name__)


def _atomic_save(save: Callable[[Path], object], target: Path) -> None:
    """Publish a converted catalog folder atomically, so a crash leaves no half cache; if another process won
    the race, keep theirs."""
    publish_folder(target, save, staging_prefix=f".{target.name}-", keep_existing=lambda _: True)


def _catalog_tokenizer(name: str, cache_dir: Path) -> Any:
    from transformers import AutoTokenizer

    folder = Path(cache_dir) / name / "tokenizer"
    if not (folder / "tokenizer.json").exists():
        gguf = catalog_gguf_path(name, cache_dir)
        logger.info("converting the %s tokenizer from %s (once; cached in %s)", name, gguf, folder)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        _atomic_save(lambda path: tokenizer.save_pretrained(str(path)), folder)
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_tokenizer(
    reference: str, *, cache_dir: Path, trust_remote_code: bool = False, revision: str | None = None,
    role: str = "tokenizer",
) -> Any:
    """Load a fast tokenizer from a catalog name, a Hugging Face folder, a ``tokenizer.json`` or a hub id
    (at ``revision``, the same one its weights are loaded from: a tokenizer of another branch can differ).

    A tokenizer that cannot report offsets (a slow tokenizer) is refused: span alignment needs them.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(reference).expanduser()
    if reference in CATALOG:
        tokenizer = _catalog_tokenizer(reference, Path(cache_dir))
    elif path.is_file() and path.suffix == ".json":
        try:
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
        except Exception as error:  # the tokenizers library raises its own exception types
            raise ModelLoadError(f"{path} is not a valid tokenizer.json: {error}") from error
    elif path.is_dir():
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"cannot load a tokenizer from the folder {path}: {error}") from error
    elif path.exists():
        raise ModelLoadError(f"{path} is neither a folder nor a tokenizer.json; give a Hugging Face folder or file")
    else:
        tokenizer = _hub_tokenizer(reference, trust_remote_code, revision, role)
    require_offsets(tokenizer, role)
    return tokenizer


def _hub_unreachable_reason(reference: str) -> str | None:
    """Why the Hugging Face Hub cannot serve ``reference`` right now, or None if it may.

    Checked before any download so that an unreachable hub fails in seconds: the hub client otherwise
    retries with back-off for about a minute per file.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as error:
        return f"{host} is unreachable ({error})"
    return None


def _from_hub(load: Callable[..., Any], reference: str, role: str, **kwargs: Any) -> Any:
    """``load(reference, **kwargs)`` from the local hub cache or the hub, with one clear error on failure."""
    from huggingface_hub import try_to_load_from_cache

    reason = _hub_unreachable_reason(reference)
    try:
        if reason is not None and not isinstance(try_to_load_from_cache(reference, "config.json"), str):
            raise OSError(reason)  # not in the local hub cache either: fail now, not after a minute of retries
        return load(reference, local_files_only=reason is not None, **kwargs)
    except (OSError, ValueError) as error:
        detail = reason or f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        raise ModelLoadError(
            f"the {role} {reference!r} is not a catalog model ({', '.join(sorted(CATALOG))}), not a local folder "
            f"or tokenizer.json, and is not available from the Hugging Face Hub ({detail}); pass a local folder, "
            "or run where the hub is reachable"
        ) from error


def _hub_tokenizer(reference: str, trust_remote_code: bool, revision: str | None, role: str = "tokenizer") -> Any:
    from transformers import AutoTokenizer

    return _from_hub(AutoTokenizer.from_pretrained, reference, role, revision=revision,
                     trust_remote_code=trust_remote_code)



def _catalog_model_folder(name: str, cache_dir: Path) -> Path:
    """The cached safetensors folder of a catalog model, converting its GGUF once on first use.

    The GGUF is dequantised to fp32 and written as a plain Hugging Face folder (safetensors + tokenizer),
    so later loads take about a second instead of a minute.
    """
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(cache_dir) / name / "model"
    if (folder / "config.json").exists():
        return folder
    gguf = catalog_gguf_path(name, cache_dir)
    logger.info("converting %s from %s to safetensors (once; cached in %s)", name, gguf, folder)
    tokenizer = _catalog_tokenizer(name, cache_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, local_files_only=True, dtype=torch.float32
    )
    # save_pretrained refuses a model that still carries its GGUF quantizer; the weights are already fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def save(path: Path) -> None:
        model.save_pretrained(str(path), safe_serialization=True)
        tokenizer.save_pretrained(str(path))

    _atomic_save(save, folder)
    return folder


def resolve_model_folder(reference: str, *, cache_dir: Path) -> Path | None:
    """The local folder a reference names (converting a catalog entry on first use), or None for a hub id."""
    if reference in CATALOG:
        return _catalog_model_folder(reference, Path(cache_dir))
    path = Path(reference).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"{path} is a file; a model is a Hugging Face folder (config.json + *.safetensors)")
    return None


def check_model_folder(folder: Path) -> None:
    """Refuse a folder :func:`load_causal_lm` cannot load safely (raises ModelLoadError naming the fix): no
    config.json, or no safetensors weights (a pickled ``.bin`` can run code when loaded). Cheap: nothing is read."""
    if not (folder / "config.json").exists():
        raise ModelLoadError(f"{folder} has no config.json; it is not a Hugging Face model folder")
    if not any(folder.glob("*.safetensors")):
        raise ModelLoadError(
            f"{folder} holds no *.safetensors weights; pickled .bin weights are refused because loading them "
            "can run arbitrary code. Convert them once with model.save_pretrained(dir, safe_serialization=True)"
        )


def load_causal_lm(
    reference: str,
    *,
    cache_dir: Path,
    dtype: Any = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    role: str = "model",
) -> tuple[Any, Any]:
    """Load ``(model, fast tokenizer)`` from a catalog name, a Hugging Face folder or a hub id.

    Refuses what is unsafe or cannot work: weights load from safetensors only (a pickled ``.bin`` can run
    code when loaded), remote code runs only when ``trust_remote_code`` is set, and a tokenizer without
    offsets is an error. ``dtype`` defaults to fp32.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    folder = resolve_model_folder(reference, cache_dir=cache_dir)
    if folder is not None:
        check_model_folder(folder)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), local_files_only=True, use_safetensors=True, dtype=dtype,
                trust_remote_code=trust_remote_code,
            )
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"cannot load the {role} from {folder}: {error}") from error
        tokenizer = load_tokenizer(str(folder), cache_dir=cache_dir, trust_remote_code=trust_remote_code, role=role)
        return model, tokenizer
    model = _from_hub(
        AutoModelForCausalLM.from_pretrained, reference, role,
        revision=revision, use_safetensors=True, dtype=dtype, trust_remote_code=trust_remote_code,
    )
    tokenizer = _hub_tokenizer(reference, trust_remote_code, revision, role)
    require_offsets(tokenizer, role)
    return model, tokenizer


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of everything about a tokenizer that changes token ids: its model, special tokens, template."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = {
        "tokenizer": backend.to_str() if backend is not None else type(tokenizer).__name__,
        "special": {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def model_fingerprint(reference: str, *, cache_dir: Path, revision: str | None = None, memo_file: Path | None = None) -> str:
    """A content identity of a model reference, for stage cache keys.

    Catalog entries are identified by name and package version (their GGUF is sha256-checked on install);
    local folders by the sha256 of their config and weight files (memoised by size and mtime); hub ids by
    id and revision.
    """
    from ctpd_core.artifacts import content_key, folder_fingerprint

    if reference in CATALOG:
        entry = CATALOG[reference]
        try:
            version = importlib.metadata.version(entry.distribution)
        except importlib.metadata.PackageNotFoundError:
            version = "not-installed"
        return content_key({"catalog": reference, "package": entry.distribution, "version": version})
    path = Path(reference).expanduser()
    if path.is_dir():
        return content_key({"folder": folder_fingerprint(path, memo_file)})
    return content_key({"hub": reference, "revision": revision})
