"""The layout of a Triton model repository: `<repo>/<model>/config.pbtxt` and numeric versions."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from opserve.errors import InvalidArgumentError
from opserve.hints import is_version_name, model_folder_instead, no_version_folders
from opserve.proto import ModelConfig

log = logging.getLogger(__name__)


def find_models(repositories: Iterable[Path]) -> dict[str, Path]:
    """Model name -> model folder, over every repository; a name in two repositories is an error.
    One folder given twice is one repository (Triton accepts a repeated --model-repository)."""
    models: dict[str, Path] = {}
    seen: set[Path] = set()
    for repository in repositories:
        if repository.exists():
            resolved = repository.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
        problem = repository_problem(repository)
        if problem is not None:
            raise InvalidArgumentError(problem)
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


def repository_problem(repository: Path) -> str | None:
    """Why `repository` cannot be served as a model repository (one line), or None: it does
    not exist, is no directory, or is one model's folder (the message names the one to pass)."""
    if not repository.exists():
        return f"model repository '{repository}' does not exist"
    if not repository.is_dir():
        return f"model repository '{repository}' is not a directory"
    return model_folder_instead(repository)


def version_folders(model_dir: Path) -> dict[int, Path]:
    """Numeric version folders; other names and names with a leading zero are ignored, as in Triton."""
    versions: dict[int, Path] = {}
    for entry in model_dir.iterdir():
        if entry.is_dir() and is_version_name(entry.name):
            versions[int(entry.name)] = entry
    return versions


def no_versions_reason(config: ModelConfig, model_dir: Path, available: Iterable[int]) -> str:
    """Why no version of a model loads: no version folders at all (what the folder holds, and
    the rule), or a `version_policy` that names only versions without a folder."""
    existing = sorted(available)
    if not existing:
        return no_version_folders(model_dir)
    wanted = sorted(config.version_policy.specific.versions)
    return (
        f"version_policy asks for version{'s' if len(wanted) > 1 else ''} "
        f"{', '.join(map(str, wanted))}, but '{model_dir}' has only version folder"
        f"{'s' if len(existing) > 1 else ''} {', '.join(map(str, existing))}"
    )


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
        chosen = [v for v in versions if v in wanted]
        if missing and chosen:  # with none chosen, `no_versions_reason` says it as an error
            log.warning(
                "model '%s': version_policy asks for versions %s, but the model has version "
                "folders %s only: loading %s",
                config.name,
                ", ".join(map(str, sorted(wanted))),
                ", ".join(map(str, sorted(versions))),
                ", ".join(map(str, sorted(chosen))),
            )
        return chosen
    count = policy.latest.num_versions if choice == "latest" else 1
    return versions[: max(count, 1)]


_MAX_VERSION = (1 << 63) - 1


def parse_version(text: str) -> int | None:
    """A request's model version: None for "" (the latest ready one), else its number; a
    string that is not one (a word, a non-ASCII digit, past int64) is refused in Triton's words."""
    if not text:
        return None
    if text.isascii() and text.isdigit() and len(text) <= 19 and int(text) <= _MAX_VERSION:
        return int(text)
    shown = text if len(text) <= 100 else text[:100] + "..."
    if text.startswith("-") and text[1:].isascii() and text[1:].isdigit():
        raise InvalidArgumentError(
            f"invalid model version specified '{shown}' , version should be an integral value > 0"
        )
    raise InvalidArgumentError(
        f"failed to get model version from specified version string '{shown}' (details: stol), "
        "version should be an integral value > 0"
    )
