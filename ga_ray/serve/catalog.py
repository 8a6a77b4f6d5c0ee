"""Which model ids a server has: `base`, `finetuned` and every complete folder of `RUN_DIR/variants/`.

A model id is only ever looked up in this catalog, never joined onto a path: the folder of a variant
is the one `ga_ray.steer.io.list_variants` found inside the run's `variants/` (a non-dot folder with
a `variant.json`), resolved and checked to lie inside it (a symlink pointing elsewhere is skipped).
New folders appear on the next scan (at most every `refresh_interval_s`, and at once on a miss), so
variants written while the server runs are servable without a restart.

An id is never re-bound to other content: the first content hash seen for a name is kept; a folder
that later shows another hash under the same name is refused (HTTP 409) rather than served, so no
cache anywhere can answer with a stale adapter.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ga_ray.engine.protocol import BASE, FINETUNED, RESERVED_IDS
from ga_ray.errors import GaRayError
from ga_ray.steer import io as variants_io

log = logging.getLogger("ga_ray.serve")


@dataclass(frozen=True)
class CatalogEntry:
    id: str
    path: Path | None  # None for `base`
    content_hash: str | None
    kind: str


class ConflictError(GaRayError):
    """A variant folder whose content changed under a name already served."""


class VariantCatalog:
    """The model ids of one run: `base`, `finetuned` (the run's adapter, when it has one) and its variants."""

    def __init__(self, run_dir: str | Path, adapter: str | Path | None, refresh_interval_s: float = 1.0) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.variants_dir = variants_io.variants_dir(self.run_dir).resolve()
        self.refresh_interval_s = float(refresh_interval_s)
        self._lock = threading.Lock()
        self._entries: dict[str, CatalogEntry] = {BASE: CatalogEntry(BASE, None, None, "base")}
        self._first_hash: dict[str, str | None] = {}
        self._conflicts: dict[str, str] = {}
        self._last_scan = float("-inf")
        if adapter is not None:
            self._entries[FINETUNED] = CatalogEntry(FINETUNED, Path(adapter).resolve(), None, "finetuned")
        self.refresh(force=True)

    # ------------------------------------------------------------------------------- scanning

    def refresh(self, force: bool = False) -> None:
        """Rescan `variants/` (unless scanned less than `refresh_interval_s` ago and not `force`)."""
        with self._lock:
            if not force and time.monotonic() - self._last_scan < self.refresh_interval_s:
                return
            self._last_scan = time.monotonic()
            try:
                rows = variants_io.list_variants(self.variants_dir)
            except GaRayError as exc:  # a half-edited variant.json: keep what we have, say so
                log.warning("variants scan: %s", exc)
                return
            present: dict[str, CatalogEntry] = {}
            for row in rows:
                entry = self._entry(row)
                if entry is not None:
                    present[entry.id] = entry
            fixed = {k: v for k, v in self._entries.items() if k in RESERVED_IDS}
            self._entries = {**fixed, **present}

    def _entry(self, row: dict) -> CatalogEntry | None:
        name = row.get("name")
        folder = Path(row["dir"]).resolve()
        if not isinstance(name, str) or name in RESERVED_IDS or name.startswith("."):
            log.warning("variants: skipping %s (name %r is not a servable id)", folder, name)
            return None
        if folder.parent != self.variants_dir:  # a symlink out of variants/: never loaded
            log.warning("variants: skipping %s (it resolves outside %s)", row["dir"], self.variants_dir)
            return None
        if folder.name != name:
            log.warning("variants: skipping %s (its variant.json names it %r)", folder, name)
            return None
        chash = row.get("content_hash")
        first = self._first_hash.setdefault(name, chash)
        if first != chash:
            self._conflicts[name] = (f"variant {name!r} was first served with content hash {first} and its folder now holds "
                                     f"{chash}; an id is never reused for other content: write it under a new name")
            return None
        return CatalogEntry(name, folder, chash, str(row.get("kind") or "variant"))

    # ------------------------------------------------------------------------------- lookups

    def ids(self) -> list[str]:
        with self._lock:
            fixed = [i for i in (BASE, FINETUNED) if i in self._entries]
            return fixed + sorted(i for i in self._entries if i not in RESERVED_IDS)

    def get(self, model_id: str) -> CatalogEntry | None:
        """The entry of `model_id`, rescanning once on a miss; None when unknown. Raises ConflictError
        when the id's folder changed content."""
        for attempt in (0, 1):
            with self._lock:
                if model_id in self._conflicts:
                    raise ConflictError(self._conflicts[model_id])
                entry = self._entries.get(model_id)
            if entry is not None or attempt == 1:
                return entry
            self.refresh()  # at most every refresh_interval_s: a flood of unknown ids does not rescan the disk each time
        return None
