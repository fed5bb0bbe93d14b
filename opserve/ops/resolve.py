"""Resolving `model_operations { op_library_filename: ... }` and the server-wide libraries.

A relative path resolves inside the model's folder, then inside the version folder, so that a
model and its ops are deployed, versioned and removed together.
"""

from __future__ import annotations

import os
from pathlib import Path

from opserve.errors import UnavailableError
from opserve.proto import ModelConfig


def resolve_model_libraries(
    config: ModelConfig, model_dir: Path, version_dir: Path, allowed_roots: list[Path] | None = None
) -> list[Path]:
    """The model's own op libraries, as absolute paths; a missing one is an error naming it.

    A relative path must stay inside the model's folder (after following links); an absolute
    one must lie inside `allowed_roots` (the repositories and the --op-library-root folders).
    """
    libraries: list[Path] = []
    model_root = model_dir.resolve()
    for entry in config.model_operations.op_library_filename:
        candidate = Path(entry)
        if candidate.is_absolute():
            real = candidate.resolve()
            if allowed_roots is not None and not any(real.is_relative_to(r) for r in allowed_roots):
                raise UnavailableError(
                    f"op library '{entry}' of model '{config.name}' is outside the model repository "
                    "and every --op-library-root; keep it in the model's folder or allow its folder "
                    "with --op-library-root"
                )
            searched = [candidate]
        else:
            searched = [model_dir / candidate, version_dir / candidate]
            if not all(p.resolve().is_relative_to(model_root) for p in searched):
                raise UnavailableError(
                    f"op library '{entry}' of model '{config.name}' escapes the model's folder "
                    f"'{model_dir}'; relative paths must stay inside it"
                )
        found = next((p for p in searched if p.is_file()), None)
        if found is None:
            where = " or ".join(f"'{p}'" for p in searched)
            raise UnavailableError(
                f"op library '{entry}' of model '{config.name}' was not found (looked for {where})"
            )
        libraries.append(found.resolve())
    return libraries


# the config parameter naming C++ op sources that are built, for the model's framework, at load
SOURCES_PARAMETER = "OP_LIBRARY_SOURCES"


def model_op_sources(config: ModelConfig, model_dir: Path) -> list[Path]:
    """The op sources a model ships instead of a library (`OP_LIBRARY_SOURCES`: paths inside
    the model's folder, separated by commas); a missing or escaping one is an error naming it."""
    parameter = config.parameters.get(SOURCES_PARAMETER)
    if parameter is None or not parameter.string_value.strip():
        return []
    model_root = model_dir.resolve()
    sources = []
    for entry in (e.strip() for e in parameter.string_value.split(",")):
        if not entry:
            continue
        path = model_dir / entry
        if Path(entry).is_absolute() or not path.resolve().is_relative_to(model_root):
            raise UnavailableError(
                f"op source '{entry}' of model '{config.name}' ({SOURCES_PARAMETER}) is not "
                f"inside the model's folder '{model_dir}'; name sources relative to it"
            )
        if not path.is_file():
            raise UnavailableError(
                f"op source '{entry}' of model '{config.name}' ({SOURCES_PARAMETER}) was not "
                f"found (looked for '{path}')"
            )
        sources.append(path)
    return sources


# `opserve serve` moves LD_PRELOAD here and re-executes itself, so that the server process stays
# free of frameworks; each worker then gets the preloaded libraries of its own framework.
PRELOAD_HANDOFF = "OPSERVE_LD_PRELOAD"


def preloaded_libraries(environ: dict[str, str] | None = None) -> list[Path]:
    """The libraries the operator preloaded (LD_PRELOAD: separated by colons or spaces)."""
    env = environ if environ is not None else os.environ
    value = env.get(PRELOAD_HANDOFF) or env.get("LD_PRELOAD", "")
    return [Path(item) for item in value.replace(":", " ").split() if item]
