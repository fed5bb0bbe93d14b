"""Messages for a repository laid out the wrong way: what was found, the rule, and the fix.

Pure functions over the file system, cheap to import (workers use them too).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

VERSION_RULE = (
    "version folders have numeric names such as 1/ (names with a leading zero are ignored)"
)
MODEL_FILE_SUFFIXES = (".onnx", ".pt", ".savedmodel", ".graphdef", ".plan", ".py")
_SHOWN = 8  # entries of a folder named in a message


def is_version_name(name: str) -> bool:
    return name.isdigit() and (len(name) == 1 or name[0] != "0")


def folder_contents(folder: Path) -> str:
    """'config.pbtxt, v1/, model.onnx' (folders end in '/'; hidden entries left out)."""
    try:
        entries = sorted(e for e in folder.iterdir() if not e.name.startswith("."))
    except OSError:
        return "nothing readable"
    if not entries:
        return "nothing"
    names = [e.name + ("/" if e.is_dir() else "") for e in entries]
    more = len(names) - _SHOWN
    return ", ".join(names[:_SHOWN]) + (f" and {more} more" if more > 0 else "")


def no_version_folders(model_dir: Path) -> str:
    return f"no version folders found in '{model_dir}': it holds {folder_contents(model_dir)}; {VERSION_RULE}"


def missing_model_file(path: Path) -> str:
    """The model file is missing: name what the version folder holds, and the setting that
    would pick a file of another name."""
    message = f"model file '{path}' does not exist"
    folder = path.parent
    if not folder.is_dir():
        return message
    suffix = path.suffix
    candidates = sorted(
        e.name
        for e in folder.iterdir()
        if e.name != path.name
        and not e.name.startswith(".")
        and (e.suffix == suffix if suffix else e.suffix in MODEL_FILE_SUFFIXES)
    )
    if candidates:
        return (
            f"{message}; '{folder}' holds {', '.join(repr(c) for c in candidates)}: rename it to "
            f"'{path.name}' or set default_model_filename: \"{candidates[0]}\" in config.pbtxt"
        )
    return f"{message}; '{folder}' holds {folder_contents(folder)}"


def with_closest(message: str, value: str, valid: Iterable[str], what: str) -> str:
    """`message`, then the valid values and the closest one to `value` (a typo's fix)."""
    choices = sorted({v for v in valid if v})
    closest = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
    hint = f" (did you mean '{closest[0]}'?)" if closest else ""
    return f"{message}; valid {what}: {', '.join(choices)}{hint}"


def model_folder_instead(repository: Path) -> str | None:
    """Why `repository` looks like one model's folder rather than a repository of models (its
    children are version folders and it holds a config.pbtxt or model files), or None."""
    if not repository.is_dir():
        return None
    entries = [e for e in repository.iterdir() if not e.name.startswith(".")]
    versions = sorted(e.name for e in entries if e.is_dir() and is_version_name(e.name))
    marks = sorted(
        e.name
        for e in entries
        if e.name == "config.pbtxt" or (e.is_file() and e.suffix in MODEL_FILE_SUFFIXES)
    )
    if not versions or not marks:
        return None
    parent = repository.parent if repository.name not in ("", "..") else repository.resolve().parent
    return (
        f"'{repository}' looks like a model folder, not a model repository: it holds "
        f"{', '.join(marks)} and the version folder{'s' if len(versions) > 1 else ''} "
        f"{', '.join(v + '/' for v in versions)}; pass the folder that contains it: "
        f"--model-repository {parent}"
    )
