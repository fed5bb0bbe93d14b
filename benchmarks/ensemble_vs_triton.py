"""An ensemble of two Python identity steps: opserve against Triton 2.51 serving the same repository.

The repository holds ../shared/peers/identity (a `model.py` identity, FP32 [-1], `max_batch_size:
64`, `dynamic_batching {}`; linked, not copied) and `ensemble_identity`, an ensemble that runs it
twice in a chain (INPUT0 -> identity -> between -> identity -> OUTPUT0). perf_analyzer loads the
ensemble; each request is two requests to the identity model inside the server.

Everything else (installing Triton and perf_analyzer, the A B A B rounds, perf_analyzer's cells
over HTTP and gRPC at concurrency 1, 4 and 8, the table) is python_identity_vs_triton.py's, which
this script drives with the ensemble as the model under load.

    python benchmarks/ensemble_vs_triton.py [--rounds 2] [--measurement-interval 3000]
        [--json results.json] [--opserve-only | --triton-only] [--peers /tmp/peers]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import python_identity_vs_triton as side_by_side  # noqa: E402

ENSEMBLE = "ensemble_identity"
ENSEMBLE_CONFIG = f"""name: "{ENSEMBLE}"
platform: "ensemble"
max_batch_size: 64
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
ensemble_scheduling {{
  step [
    {{ model_name: "identity" model_version: -1
      input_map {{ key: "INPUT0" value: "INPUT0" }}
      output_map {{ key: "OUTPUT0" value: "between" }} }},
    {{ model_name: "identity" model_version: -1
      input_map {{ key: "INPUT0" value: "between" }}
      output_map {{ key: "OUTPUT0" value: "OUTPUT0" }} }}
  ]
}}
"""


def write_repository(repository: Path) -> None:
    """The identity model (linked) and the ensemble of two identity steps."""
    repository.mkdir(parents=True, exist_ok=True)
    (repository / "identity").symlink_to(side_by_side.MODEL_FOLDER, target_is_directory=True)
    folder = repository / ENSEMBLE
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(ENSEMBLE_CONFIG)


def main() -> int:
    side_by_side.MODEL = ENSEMBLE  # the model perf_analyzer loads and the readiness check asks
    side_by_side.prepare_repository = write_repository
    return side_by_side.main()


if __name__ == "__main__":
    sys.exit(main())
