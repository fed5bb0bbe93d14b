"""The model repository: its layout on disk, and the lifecycle of the models it holds."""

from opserve.repository.layout import find_models, select_versions, version_folders
from opserve.repository.manager import ModelManager, ModelState, ModelVersion

__all__ = [
    "ModelManager",
    "ModelState",
    "ModelVersion",
    "find_models",
    "select_versions",
    "version_folders",
]
