"""A Hugging Face Hub stand-in for tests (no network): hub ids at given revisions served from local folders.

``FakeHub(monkeypatch, {("org/name", "v2"): folder})`` makes ``AutoTokenizer.from_pretrained`` and
``AutoModelForCausalLM.from_pretrained`` serve ``folder`` for ``org/name`` *only at revision v2*, as a hub with
a newer default branch would: a load that forgets the revision gets an OSError, the hub client's error for a
missing file. Every hub call is kept in ``calls``. Local paths pass through to transformers unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class HubCall:
    loader: str  # "tokenizer" or "model"
    repo_id: str
    revision: str | None


class FakeHub:
    def __init__(self, monkeypatch: Any, repos: dict[tuple[str, str], Path]) -> None:
        import transformers

        import ctpd_core.models as models_module

        self.repos, self.calls = repos, []
        served_ids = {repo_id for repo_id, _ in repos}
        # The real hub is never asked, not even whether it is reachable.
        monkeypatch.setattr(models_module, "_hub_unreachable_reason", lambda reference: None)
        for loader, cls in (("tokenizer", transformers.AutoTokenizer), ("model", transformers.AutoModelForCausalLM)):
            real = cls.from_pretrained

            def serve(reference: Any, *args: Any, loader: str = loader, real: Any = real, **kwargs: Any) -> Any:
                if str(reference) not in served_ids:
                    return real(reference, *args, **kwargs)
                revision = kwargs.pop("revision", None)
                self.calls.append(HubCall(loader, str(reference), revision))
                folder = self.repos.get((str(reference), revision))
                if folder is None:
                    raise OSError(f"{reference} has no revision {revision!r} on this hub")
                return real(str(folder), *args, **kwargs)

            monkeypatch.setattr(cls, "from_pretrained", serve)
