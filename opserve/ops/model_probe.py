"""Asking throwaway processes about model files, for `opserve check`: the custom ops each model
uses, and the signature its backend describes, loaded as its worker would load it
(`python -m opserve.ops.probe models`). Nothing is loaded into the calling process.

Versions without op libraries of their own share one process per backend (the framework is
imported once); a version with its own libraries gets a process to itself, since two models'
libraries may register the same op. When a shared process dies, its versions are asked again,
one process each, so that a crash is told about the version that caused it.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from opserve.config import config_to_json
from opserve.ops.probe import MODEL_RESULT_MARK
from opserve.proto import ModelConfig
from opserve.signature import ModelSignature, TensorSpec

PROBE_TIMEOUT_S = 300.0


@dataclass
class ModelJob:
    """One model version to probe, with every op library its worker would load."""

    config: ModelConfig
    model_dir: Path
    version_dir: Path
    op_libraries: list[Path] = field(default_factory=list)
    server_op_libraries: list[Path] = field(default_factory=list)
    preloaded_libraries: list[Path] = field(default_factory=list)
    python: str = sys.executable  # the interpreter (and so the framework) its workers run under

    def to_json(self) -> dict[str, object]:
        return {
            "model": self.config.name,
            "backend": self.config.backend,
            "config": base64.b64encode(self.config.SerializeToString()).decode(),
            "config_json": json.dumps(config_to_json(self.config)),
            "model_dir": str(self.model_dir),
            "version_dir": str(self.version_dir),
            "op_libraries": [str(p) for p in self.op_libraries],
            "server_op_libraries": [str(p) for p in self.server_op_libraries],
            "preloaded_libraries": [str(p) for p in self.preloaded_libraries],
        }


@dataclass
class ModelFacts:
    uses: list[str] = field(default_factory=list)  # custom ops the model file uses
    signature: ModelSignature | None = None  # as its backend describes it; None when it failed
    error: str | None = None  # why its backend could not describe it
    uses_error: str | None = None  # why its file could not be read for ops

    @classmethod
    def from_json(cls, data: dict[str, object]) -> ModelFacts:
        signature = None
        described = data.get("signature")
        if isinstance(described, dict):
            signature = ModelSignature(
                *(
                    tuple(TensorSpec(n, t, tuple(s)) for n, t, s in described[kind])
                    for kind in ("inputs", "outputs")
                )
            )
        uses = data.get("uses")
        return cls(
            uses=list(uses) if isinstance(uses, list) else [],
            signature=signature,
            error=str(data["error"]) if data.get("error") else None,
            uses_error=str(data["uses_error"]) if data.get("uses_error") else None,
        )


def probe_models(jobs: list[ModelJob]) -> list[ModelFacts]:
    """Facts about each job's model version, in order (blocking)."""
    results: list[ModelFacts | None] = [None] * len(jobs)
    shared: dict[tuple[str, str], list[int]] = {}
    alone: list[list[int]] = []
    for index, job in enumerate(jobs):
        if job.op_libraries:
            alone.append([index])
        else:
            shared.setdefault((job.python, job.config.backend), []).append(index)
    for group in [*shared.values(), *alone]:
        answers = _run([jobs[i] for i in group])
        if answers is None and len(group) > 1:
            for index in group:
                results[index] = (_run([jobs[index]]) or [_crashed()])[0]
            continue
        for index, answer in zip(group, answers or [_crashed()] * len(group), strict=True):
            results[index] = answer
    return [r if r is not None else _crashed() for r in results]


def _crashed(detail: str = "") -> ModelFacts:
    return ModelFacts(error=f"loading the model crashed its probe{detail}")


def _run(jobs: list[ModelJob]) -> list[ModelFacts] | None:
    """One probe process for `jobs` (one interpreter); None when it died without answering."""
    try:
        result = subprocess.run(
            [jobs[0].python, "-m", "opserve.ops.probe", "models"],
            input=json.dumps([job.to_json() for job in jobs]),
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return [
            ModelFacts(error=f"loading the model took longer than {PROBE_TIMEOUT_S:.0f} s")
        ] * len(jobs)
    for line in reversed(result.stdout.splitlines()):
        if line.startswith(MODEL_RESULT_MARK):
            answers = json.loads(line[len(MODEL_RESULT_MARK) :])
            return [ModelFacts.from_json(a) for a in answers]
    if len(jobs) > 1:
        return None
    detail = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    if result.returncode < 0:
        detail = f"killed by signal {-result.returncode}" + (f"; {detail}" if detail else "")
    return [_crashed(f" ({detail})" if detail else "")]
