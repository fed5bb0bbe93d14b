"""The layout of a Triton model repository: `<repo>/<model>/config.pbtxt` and numeric versions."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from opserve.errors import InvalidArgumentError
from opserve.proto import ModelConfig

log = logging.getLogger(__name__)


def find_models(repositories: Iterable[Path]) -> dict[str, Path]:
    """Model name -> model folder, over every repository; a name in two repositories is an error."""
    models: dict[str, Path] = {}
    for repository in repositories:
        if not repository.is_dir():
            raise InvalidArgumentError(f"model repository '{repository}' is not a directory")
        for entry in sorted(repository.iterdir()):
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            if entry.name in models:
                raise InvalidArgumentError(
                    f"model '{entry.name}' appears in two repositories: "
                    f"'{models[entry.name]}' and '{entry}'"
                )
            models[entry.name] = entry
    return models


def version_folders(model_dir: Path) -> dict[int, Path]:
    """Numeric version folders; other names and names with a leading zero are ignored, as in Triton."""
    versions: dict[int, Path] = {}
    for entry in model_dir.iterdir():
        name = entry.name
        if not entry.is_dir() or not name.isdigit() or (len(name) > 1 and name[0] == "0"):
            continue
        versions[int(name)] = entry
    return versions


def select_versions(config: ModelConfig, available: Iterable[int]) -> list[int]:
    """The versions the config's `version_policy` asks for, highest first."""
    versions = sorted(available, reverse=True)
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return versions
    if choice == "specific":
        wanted = set(policy.specific.versions)
        missing = sorted(wanted - set(versions))
        if missing:
            log.warning(
                "model '%s': version policy asks for versions %s that do not exist",
                config.name,
                ", ".join(map(str, missing)),
            )
        return [v for v in versions if v in wanted]
    count = policy.latest.num_versions if choice == "latest" else 1
    return versions[: max(count, 1)]
