"""The run directory: one folder per stage, `config.yaml`, and `manifest.json`.

Every artifact is written atomically: to a temporary sibling first, then renamed into place, so a
killed run never leaves a half-written file or folder that a later stage would trust. The manifest
records, per stage, its status, the fingerprint of its inputs, wall time, versions and host; a stage
is skipped when it finished before with the same input fingerprint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ga_ray.errors import StageError

MANIFEST = "manifest.json"
CONTENT_HASH_MAX_BYTES = 64 << 20
"""Files above this size are fingerprinted by size and modification time instead of content."""


def cannot_write(path: Path, exc: OSError) -> StageError:
    """One line for a failed write (read-only run directory, full disk, a file where a folder should be)."""
    path = Path(path)
    reason = exc.strerror or type(exc).__name__
    blocker = next((q for q in (path, *path.parents) if q.exists() and not q.is_dir()), None)
    if blocker is not None and blocker != path:
        return StageError(f"cannot write {path}: {blocker} is a file, not a folder; move it away or choose another --run-dir")
    folder = next((q for q in path.parents if q.exists()), path.parent)  # the folder that refused it
    return StageError(f"cannot write {path} ({reason}): make {folder} writable (or free disk space), or choose another --run-dir")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise cannot_write(path, exc) from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Build a folder under a temporary name; it replaces `path` only if the block finishes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise cannot_write(tmp, exc) from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def fingerprint_path(path: Path) -> str:
    """Hash of a file, or of a folder's files (names, sizes and bytes; big files by size and mtime), ignoring temp files."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        files = [path]
        root = path.parent
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        root = path
    else:
        return "missing"
    for f in files:
        st = f.stat()
        h.update(str(f.relative_to(root)).encode())
        h.update(str(st.st_size).encode())
        if st.st_size > CONTENT_HASH_MAX_BYTES:
            # multi-GB weights: re-reading them on every run costs minutes; size + mtime catch a replaced file
            h.update(str(st.st_mtime_ns).encode())
            continue
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def fingerprint_obj(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("ga-ray", "ray", "torch", "transformers", "peft", "scikit-learn", "pyarrow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


class RunDir:
    """A run directory and its manifest."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        if self.root.exists() and not self.root.is_dir():
            raise StageError(f"run directory {self.root} is a file, not a folder: choose another --run-dir, or move the file away")
        blocker = next((q for q in self.root.parents if q.exists() and not q.is_dir()), None)
        if blocker is not None:
            raise StageError(f"run directory {self.root} lies under {blocker}, which is a file: choose another --run-dir")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StageError(
                f"cannot create run directory {self.root} ({exc.strerror or type(exc).__name__}): choose another --run-dir, "
                f"or make its parent writable"
            ) from None

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def read_manifest(self) -> dict[str, Any]:
        path = self.manifest_path
        if not path.exists():
            return {"stages": {}}
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise self._bad_manifest(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise self._bad_manifest(f"cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
        if not isinstance(manifest, dict):
            raise self._bad_manifest(f"the top level is a JSON {type(manifest).__name__}, not an object")
        stages = manifest.setdefault("stages", {})
        if not isinstance(stages, dict) or not all(isinstance(r, dict) for r in stages.values()):
            raise self._bad_manifest("'stages' must map each stage name to an object")
        return manifest

    def _bad_manifest(self, detail: str) -> StageError:
        path = self.manifest_path
        return StageError(
            f"{path} is damaged ({detail}). It records which stages finished: restore it, or move it away "
            f"(mv {path} {path}.broken) to run every stage again, or choose another --run-dir"
        )

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_json(self.manifest_path, manifest)

    def stage_record(self, stage: str) -> dict[str, Any] | None:
        return self.read_manifest()["stages"].get(stage)

    def update_stage(self, stage: str, **fields: Any) -> None:
        m = self.read_manifest()
        rec = m["stages"].setdefault(stage, {})
        rec.update(fields)
        self.write_manifest(m)

    def is_done(self, stage: str, fingerprint: str) -> bool:
        rec = self.stage_record(stage)
        return bool(rec and rec.get("status") == "done" and rec.get("fingerprint") == fingerprint)

    def mark_running(self, stage: str, fingerprint: str, inputs: dict[str, Any]) -> float:
        self.update_stage(
            stage,
            status="running",
            fingerprint=fingerprint,
            inputs=inputs,
            started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            host=socket.gethostname(),
            versions=package_versions(),
        )
        return time.perf_counter()

    def mark_done(self, stage: str, t0: float, summary: dict[str, Any]) -> None:
        self.update_stage(
            stage,
            status="done",
            wall_time_s=round(time.perf_counter() - t0, 3),
            finished_at=datetime.now(timezone.utc).isoformat(timespec="microseconds"),  # downstream fingerprints read it: a re-run within the same second must still differ,
            summary=summary,
            error=None,
        )

    def mark_failed(self, stage: str, t0: float, error: str) -> None:
        self.update_stage(stage, status="failed", wall_time_s=round(time.perf_counter() - t0, 3), error=error)

    def invalidate(self, stage: str) -> None:
        m = self.read_manifest()
        if stage in m["stages"]:
            m["stages"][stage]["status"] = "stale"
            self.write_manifest(m)
