"""Triton's platforms and backends, their default model file names, and detection from files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from opserve.ensemble import ENSEMBLE_PLATFORM
from opserve.errors import InvalidArgumentError
from opserve.hints import is_version_name, no_version_folders, with_closest
from opserve.proto import ModelConfig


@dataclass(frozen=True)
class Platform:
    platform: str  # Triton's `platform` field ("" where Triton leaves it empty)
    backend: str  # Triton's `backend` field, and the opserve backend that runs it
    default_filename: str


PLATFORMS: tuple[Platform, ...] = (
    Platform("onnxruntime_onnx", "onnxruntime", "model.onnx"),
    Platform("pytorch_libtorch", "pytorch", "model.pt"),
    Platform("tensorflow_savedmodel", "tensorflow", "model.savedmodel"),
    Platform("tensorflow_graphdef", "tensorflow", "model.graphdef"),
    Platform("tensorrt_plan", "tensorrt", "model.plan"),
    Platform("", "python", "model.py"),
)

# an ensemble has no model file and no backend: its steps are other models
ENSEMBLE = Platform(ENSEMBLE_PLATFORM, "", "")


def normalize_platform(config: ModelConfig, model_dir: Path) -> Platform:
    """Fill `platform` and `backend` into the config (from each other or from the model files)."""
    scheduled = config.HasField("ensemble_scheduling")
    if config.platform == ENSEMBLE_PLATFORM or (
        scheduled and not config.platform and not config.backend
    ):
        config.platform = ENSEMBLE_PLATFORM  # the rest is checked with its graph (opserve.ensemble)
        return ENSEMBLE
    if scheduled:
        raise InvalidArgumentError(
            f"ensemble scheduling cannot be set for model '{config.name}' whose platform is "
            f"not {ENSEMBLE_PLATFORM}"
        )
    platform = None
    if config.platform:
        platform = next((p for p in PLATFORMS if p.platform == config.platform), None)
        if platform is None:
            raise InvalidArgumentError(
                with_closest(
                    f"unexpected platform type '{config.platform}' for {config.name}",  # Triton's
                    config.platform,
                    [p.platform for p in PLATFORMS] + [ENSEMBLE_PLATFORM],
                    "platforms",
                )
            )
        if config.backend and config.backend != platform.backend:
            raise InvalidArgumentError(
                f"platform '{config.platform}' does not match backend '{config.backend}' "
                f"for model '{config.name}'"
            )
    elif config.backend:
        candidates = [p for p in PLATFORMS if p.backend == config.backend]
        if not candidates:
            raise InvalidArgumentError(
                with_closest(
                    f"unsupported backend '{config.backend}' for model '{config.name}'",
                    config.backend,
                    [p.backend for p in PLATFORMS],
                    "backends",
                )
            )
        platform = _detect(model_dir, config.default_model_filename, candidates) or candidates[0]
    else:
        platform = _detect(model_dir, config.default_model_filename, PLATFORMS)
        if platform is None and not any(
            d.is_dir() and is_version_name(d.name) for d in model_dir.iterdir()
        ):  # the model files are there, but not in a version folder
            raise InvalidArgumentError(no_version_folders(model_dir))
        if platform is None:
            raise InvalidArgumentError(
                f"unable to determine the backend of model '{config.name}': set 'backend' or "
                f"'platform' in its config.pbtxt, or use a default model file name "
                f"({', '.join(p.default_filename for p in PLATFORMS)})"
            )
    config.backend = platform.backend
    if platform.platform:
        config.platform = platform.platform
    if not config.default_model_filename:
        config.default_model_filename = platform.default_filename
    return platform


def _detect(
    model_dir: Path, filename: str, candidates: tuple[Platform, ...] | list[Platform]
) -> Platform | None:
    """The platform whose model file exists in some version folder of `model_dir`."""
    version_dirs = [
        d for d in sorted(model_dir.iterdir()) if d.is_dir() and is_version_name(d.name)
    ]
    for platform in candidates:
        for version_dir in version_dirs:
            if (version_dir / platform.default_filename).exists():
                return platform
    if filename:
        suffix = Path(filename).suffix
        for platform in candidates:
            if Path(platform.default_filename).suffix == suffix:
                return platform
    return None
