"""A repository in object storage, kept as a local folder: the cache everything else reads.

`RepositoryMirror.sync` lists the objects under the repository's prefix (or one model's) and
fetches only those whose identity (ETag or generation, size, modification time) differs from
the last sync's, into a temporary file renamed into place, so a worker reading the old file
keeps its copy; local files whose object is gone are removed. The manifest of identities lives
beside the folder, under opserve's cache (`OPSERVE_CACHE_DIR`), keyed by the URL, so a restart
fetches only what changed meanwhile.

fsspec (with s3fs, gcsfs or adlfs, imported only here and only when a remote repository is
named) is the one library behind every scheme; its errors become `RemoteRepositoryError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opserve.errors import InternalError
from opserve.remote.credentials import StorageAccess
from opserve.remote.locations import RemoteLocation
from opserve.workers.environments import cache_root

log = logging.getLogger(__name__)

# the package that serves each fsspec protocol, and the extra that installs it
_PACKAGES = {"s3": "s3fs", "gcs": "gcsfs", "abfs": "adlfs"}
_SAFE_SEGMENT = re.compile(r"[^/\x00]+")


class RemoteRepositoryError(InternalError):
    """A remote repository could not be read: unreachable, refused, missing. The message
    names the URL, never a credential."""


@dataclass(frozen=True)
class SyncReport:
    fetched: int  # objects downloaded (new or changed)
    removed: int  # local files whose object is gone
    kept: int  # objects unchanged since the last sync


class RepositoryMirror:
    """One remote repository and its local folder; `sync` is safe from any thread."""

    def __init__(
        self, location: RemoteLocation, access: StorageAccess, cache: Path | None = None
    ) -> None:
        self.location = location
        self.access = access
        digest = hashlib.sha256(location.url.encode()).hexdigest()[:16]
        base = (cache or cache_root() / "repositories") / f"{location.scheme}-{digest}"
        self.folder = base / "repository"
        self._manifest_path = base / "manifest.json"
        self._lock = threading.Lock()
        self._fs: Any = None

    def __str__(self) -> str:
        return self.location.url

    def sync(self, model: str | None = None) -> SyncReport:
        """Bring the local folder (or one model's folder in it) up to date with the store.
        The whole repository must hold at least one object; a model may be absent (its local
        folder is then removed). A model name that is not one plain folder name names no
        folder of the repository: nothing is done."""
        if model is not None and ("/" in model or not _is_safe(model)):
            return SyncReport(0, 0, 0)
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            manifest = self._read_manifest()
            subtree = model or ""
            objects = self._list(subtree)
            if model is None and not objects:
                raise RemoteRepositoryError(self._empty_reason())
            report = self._apply(objects, manifest, subtree)
            self._write_manifest(manifest)
        if report.fetched or report.removed:
            log.info(
                "model repository '%s'%s: fetched %d object(s), removed %d, kept %d",
                self.location,
                f" (model '{model}')" if model else "",
                report.fetched,
                report.removed,
                report.kept,
            )
        return report

    # the store -----------------------------------------------------------------------------
    def _filesystem(self) -> Any:
        if self._fs is None:
            self._fs = open_filesystem(self.location, self.access)
        return self._fs

    def _list(self, subtree: str) -> dict[str, dict[str, Any]]:
        """Relative path -> the object's details, under the repository (or one model)."""
        root = self.location.root
        where = f"{root}/{subtree}" if subtree else root
        with self._translated("cannot list its objects"):
            fs = self._filesystem()
            fs.invalidate_cache()
            found = fs.find(where, detail=True, withdirs=False)
        objects: dict[str, dict[str, Any]] = {}
        for path, info in found.items():
            path = path.split("://", 1)[-1]  # some filesystems keep the protocol
            if not path.startswith(f"{root}/") and root != path:
                continue
            relative = path[len(root) + 1 :]
            if subtree and not relative.startswith(f"{subtree}/"):
                continue  # a sibling whose name starts with the model's
            if not relative or relative.endswith("/") or info.get("type") == "directory":
                continue  # a folder marker
            if not _is_safe(relative):
                log.warning(
                    "model repository '%s': object '%s' is not a plain relative path; skipped",
                    self.location,
                    relative,
                )
                continue
            objects[relative] = info
        return objects

    def _empty_reason(self) -> str:
        """Why a listing found nothing: no such bucket, or nothing under the prefix."""
        with self._translated("cannot read its bucket"):
            fs = self._filesystem()
            try:
                fs.ls(self.location.bucket)
            except FileNotFoundError:
                return (
                    f"model repository '{self.location}' does not exist: "
                    f"no bucket '{self.location.bucket}'"
                )
        return f"model repository '{self.location}' does not exist: no object under it"

    def _fetch(self, objects: dict[str, str]) -> None:
        """Download `relative path -> temporary local path` pairs."""
        root = self.location.root
        with self._translated("cannot fetch its objects"):
            self._filesystem().get(
                [f"{root}/{relative}" for relative in objects], list(objects.values())
            )

    # the local folder ------------------------------------------------------------------------
    def _apply(
        self, objects: dict[str, dict[str, Any]], manifest: dict[str, str], subtree: str
    ) -> SyncReport:
        wanted = {relative: _identity(info) for relative, info in objects.items()}
        stale = {
            relative
            for relative, identity in wanted.items()
            if manifest.get(relative) != identity
            or not _has_size(self.folder / relative, objects[relative])
        }
        staging = self.folder.parent / "incoming"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            temporary = {relative: str(staging / str(i)) for i, relative in enumerate(stale)}
            if temporary:
                self._fetch(temporary)
            for relative, source in temporary.items():
                target = self.folder / relative
                _clear_way(self.folder, target)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)
                manifest[relative] = wanted[relative]
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        removed = self._remove_others(set(wanted), manifest, subtree)
        return SyncReport(len(stale), removed, len(wanted) - len(stale))

    def _remove_others(self, keep: set[str], manifest: dict[str, str], subtree: str) -> int:
        """Remove local files (under `subtree`) that no listed object accounts for."""
        top = self.folder / subtree if subtree else self.folder
        removed = 0
        for relative in [r for r in manifest if r not in keep]:
            if not subtree or relative.startswith(f"{subtree}/"):
                del manifest[relative]
        if not top.exists():
            return 0
        for path in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            relative = path.relative_to(self.folder).as_posix()
            if path.is_dir() and not path.is_symlink():
                if not any(path.iterdir()):
                    path.rmdir()
            elif relative not in keep:
                path.unlink()
                removed += 1
        if subtree and top.is_dir() and not any(top.iterdir()):
            top.rmdir()
        return removed

    def _read_manifest(self) -> dict[str, str]:
        """Relative path -> the identity it had when fetched (empty for another URL's)."""
        try:
            data = json.loads(self._manifest_path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("url") != self.location.url:
            return {}
        objects = data.get("objects")
        return dict(objects) if isinstance(objects, dict) else {}

    def _write_manifest(self, manifest: dict[str, str]) -> None:
        temporary = self._manifest_path.with_suffix(".tmp")
        temporary.write_text(
            json.dumps({"url": self.location.url, "objects": manifest}, sort_keys=True)
        )
        os.replace(temporary, self._manifest_path)

    @contextlib.contextmanager
    def _translated(self, action: str) -> Iterator[None]:
        """The one boundary where the storage library's errors become ours."""
        try:
            yield
        except RemoteRepositoryError:
            raise
        except ImportError as exc:
            raise RemoteRepositoryError(str(exc)) from None
        except Exception as exc:  # botocore, aiohttp, google and azure errors alike
            raise RemoteRepositoryError(
                f"model repository '{self.location}': {action} "
                f"(credentials from {self.access.source}): {_describe(exc)}"
            ) from exc


def open_filesystem(location: RemoteLocation, access: StorageAccess) -> Any:
    """The fsspec filesystem for `access`; a missing package names the extra to install."""
    package = _PACKAGES[access.protocol]
    try:
        import fsspec

        __import__(package)
    except ImportError:
        raise RemoteRepositoryError(
            f"model repository '{location}': {location.scheme}:// repositories need the "
            f"'{package}' package: pip install 'opserve[remote]'"
        ) from None
    options = dict(access.options)
    if access.managed_identity is not None:
        from azure.identity.aio import ManagedIdentityCredential

        options["credential"] = ManagedIdentityCredential(client_id=access.managed_identity or None)
    return fsspec.filesystem(access.protocol, **options)


def _identity(info: dict[str, Any]) -> str:
    """What changes when an object changes: its ETag (S3, Azure) or generation (GCS), size and
    modification time, as one string."""
    tag = info.get("ETag") or info.get("etag") or info.get("generation") or info.get("md5Hash")
    changed = (
        info.get("LastModified")
        or info.get("last_modified")
        or info.get("updated")
        or info.get("mtime")
    )
    return json.dumps([str(tag or ""), int(info.get("size") or 0), str(changed or "")])


def _has_size(path: Path, info: dict[str, Any]) -> bool:
    try:
        return path.is_file() and path.stat().st_size == int(info.get("size") or 0)
    except OSError:
        return False


def _is_safe(relative: str) -> bool:
    """A relative path that stays inside the folder: no empty, '.' or '..' segments (a model
    name: one such segment, no slash)."""
    parts = relative.split("/")
    return all(_SAFE_SEGMENT.fullmatch(p) and p not in (".", "..") for p in parts)


def _clear_way(folder: Path, target: Path) -> None:
    """An object `a/b` replaces a file `a` left from an object that is gone (and the reverse)."""
    for parent in reversed(target.relative_to(folder).parents):
        path = folder / parent
        if path != folder and path.exists() and not path.is_dir():
            path.unlink()
    if target.is_dir():
        shutil.rmtree(target)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"
