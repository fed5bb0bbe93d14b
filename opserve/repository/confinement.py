"""The files a model's config names stay inside the model's folder, as its op libraries do
(`ops.resolve`): a load request's `config` override must not make the server read, load or run a
file elsewhere on the machine.

- `default_model_filename` is a name inside each version folder;
- `model_warmup` input files lie in the model's `warmup/` folder, and `sequence_batching`
  initial-state files in its `initial_state/` folder;
- `EXECUTION_ENV_PATH` (a Python model's interpreter and packages): anywhere for a config.pbtxt
  (written by whoever owns the repository); from a load request, inside the model repositories or
  an `--op-library-root` folder.

A model file's name must be relative and must not climb (`..`): checked by its words, not by
following links, so a link the repository's owner placed inside a model folder still works. A name
that leaves its folder is an error naming the field.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from opserve.errors import InvalidArgumentError
from opserve.proto import ModelConfig
from opserve.sequence_config import INITIAL_STATE_FOLDER
from opserve.workers.environments import environment_path

WARMUP_FOLDER = "warmup"


def confine_model_files(
    config: ModelConfig, model_dir: Path, allowed_roots: list[Path], from_request: bool
) -> None:
    """Raise InvalidArgumentError when a file the config names lies outside where it may."""
    name = config.name
    if config.default_model_filename:
        _stays_inside(
            config.default_model_filename,
            f"default_model_filename '{config.default_model_filename}' of model '{name}'",
            "its version folder",
        )
    for sample in config.model_warmup:
        for input_name, data in sample.inputs.items():
            if data.WhichOneof("input_data_type") == "input_data_file":
                _stays_inside(
                    data.input_data_file,
                    f"input_data_file '{data.input_data_file}' of warm-up sample "
                    f"'{sample.name}' (input '{input_name}') of model '{name}'",
                    f"its {WARMUP_FOLDER}/ folder",
                )
    for state in config.sequence_batching.state:
        for initial in state.initial_state:
            if initial.WhichOneof("state_data") == "data_file":
                _stays_inside(
                    initial.data_file,
                    f"initial_state data_file '{initial.data_file}' of model '{name}'",
                    f"its {INITIAL_STATE_FOLDER}/ folder",
                )
    model_root = model_dir.resolve()
    environment = config.parameters.get("EXECUTION_ENV_PATH")
    if from_request and environment is not None and environment.string_value:
        path = environment_path(environment.string_value, model_dir).resolve()
        if not any(path.is_relative_to(root) for root in [model_root, *allowed_roots]):
            raise InvalidArgumentError(
                f"EXECUTION_ENV_PATH '{environment.string_value}' of model '{name}' in a load "
                "request's config lies outside the model repositories and every "
                "--op-library-root"
            )


def _stays_inside(name: str, what: str, folder: str) -> None:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\0" in name:
        raise InvalidArgumentError(
            f"{what} leaves the model's folder: it must be a relative name inside {folder}, "
            "without '..'"
        )
