"""Opening a repository URL as a local mirror, and fetching the repositories a command names."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from opserve.errors import InvalidArgumentError
from opserve.remote.credentials import storage_access
from opserve.remote.locations import parse_location
from opserve.remote.mirror import RepositoryMirror

# Triton's variables naming the folder a scheme's repositories are copied into
MOUNT_DIRECTORY_VARIABLES = {
    "s3": "TRITON_AWS_MOUNT_DIRECTORY",
    "gs": "TRITON_GCS_MOUNT_DIRECTORY",
    "as": "TRITON_AZURE_MOUNT_DIRECTORY",
}


def open_repository(
    url: str, env: Mapping[str, str] | None = None, cache: Path | None = None
) -> RepositoryMirror:
    """The mirror of the repository at `url` (nothing is fetched yet: call `sync`). Its folder
    lies under `cache`, else the folder Triton's TRITON_*_MOUNT_DIRECTORY names for the
    scheme (which must exist), else opserve's cache."""
    env = os.environ if env is None else env
    location = parse_location(url)
    variable = MOUNT_DIRECTORY_VARIABLES[location.scheme]
    if cache is None and env.get(variable):
        cache = Path(env[variable])
        if not cache.is_dir():
            raise InvalidArgumentError(
                f"model repository '{location}': {variable} '{cache}' is not a directory"
            )
    return RepositoryMirror(location, storage_access(location, env), cache)


def localize(
    repositories: list[str | Path], env: Mapping[str, str] | None = None
) -> tuple[list[Path], list[RepositoryMirror]]:
    """The folders to serve, each URL replaced by its mirror's folder once fetched, and the
    mirrors (to sync again later). An unreachable or refused repository raises, naming it."""
    folders: list[Path] = []
    mirrors: list[RepositoryMirror] = []
    for repository in repositories:
        if isinstance(repository, Path):
            folders.append(repository)
            continue
        mirror = open_repository(repository, env)
        mirror.sync()
        folders.append(mirror.folder)
        mirrors.append(mirror)
    return folders, mirrors
