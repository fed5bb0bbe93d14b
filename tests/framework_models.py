"""TorchScript models and TensorFlow SavedModels/GraphDefs for the tests.

Each is written by a child process (`python -m tests.framework_models KIND OUTPUT [LIBRARY]`) so
that the test process imports neither framework; `framework_model` caches the result by the
generator's source, the op library and the kind.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("OPSERVE_TEST_CACHE", ROOT / ".cache")) / "models"


def framework_model(kind: str, filename: str, library: Path | None = None) -> Path:
    """The cached model of `kind` (written on first use); `filename` is its file or folder name."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(kind.encode())
    if library is not None:
        digest.update(library.read_bytes())
    target = CACHE / digest.hexdigest()[:16] / filename
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "tests.framework_models", kind, str(target)]
        if library is not None:
            command.append(str(library))
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"writing the {kind} model failed:\n{result.stderr}")
    return target


# --- the generators, run in the child process ---------------------------------------------------


def torch_modulo(output: Path, library: str) -> None:
    import torch

    torch.ops.load_library(library)

    class Modulo(torch.nn.Module):
        def forward(self, INPUT__0: torch.Tensor, INPUT__1: torch.Tensor) -> torch.Tensor:
            return torch.ops.my_ops.custom_modulo(INPUT__0, INPUT__1)

    torch.jit.save(torch.jit.script(Modulo()), str(output))


def torch_add_one(output: Path, library: str) -> None:
    import torch

    torch.ops.load_library(library)

    class AddOne(torch.nn.Module):
        def forward(self, INPUT__0: torch.Tensor) -> torch.Tensor:
            return torch.ops.my_ops.add_one(INPUT__0)

    torch.jit.save(torch.jit.script(AddOne()), str(output))


def torch_twice_plus_one(output: Path, library: str) -> None:
    """cuda_ops::twice_plus_one, the op whose kernel is CUDA (scripting needs only its schema)."""
    import torch

    torch.ops.load_library(library)

    class TwicePlusOne(torch.nn.Module):
        def forward(self, INPUT__0: torch.Tensor) -> torch.Tensor:
            return torch.ops.cuda_ops.twice_plus_one(INPUT__0)

    torch.jit.save(torch.jit.script(TwicePlusOne()), str(output))


def torch_nested_ops(output: Path, library: str) -> None:
    """Custom ops in a submodule's forward and in a method other than forward."""
    import torch

    torch.ops.load_library(library)

    class Inner(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.my_ops.add_one(x)

    class Outer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Inner()

        def modulo(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.ops.my_ops.custom_modulo(x, y)

        def forward(self, INPUT__0: torch.Tensor, INPUT__1: torch.Tensor) -> torch.Tensor:
            return self.modulo(self.inner(INPUT__0), INPUT__1)

    torch.jit.save(torch.jit.script(Outer()), str(output))


def torch_add_sub(output: Path, library: str | None = None) -> None:
    import torch

    class AddSub(torch.nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return a + b, a - b

    torch.jit.save(torch.jit.script(AddSub()), str(output))


def torch_double(output: Path, library: str | None = None) -> None:
    import torch

    class Double(torch.nn.Module):
        def forward(self, INPUT__0: torch.Tensor) -> torch.Tensor:
            return INPUT__0 * 2

    torch.jit.save(torch.jit.script(Double()), str(output))


def torch_accumulator(output: Path, library: str | None = None) -> None:
    """A sequence model with implicit state: OUTPUT = INPUT + the state, the new state."""
    import torch

    class Accumulator(torch.nn.Module):
        def forward(
            self, INPUT__0: torch.Tensor, STATE__1: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            total = INPUT__0 + STATE__1
            return total, total

    torch.jit.save(torch.jit.script(Accumulator()), str(output))


def torch_strings(output: Path, library: str | None = None) -> None:
    """Strings both ways: the words in upper case (a List[str]) and their lengths."""
    import torch

    class Strings(torch.nn.Module):
        def forward(self, WORDS__0: list[str]) -> tuple[list[str], torch.Tensor]:
            return [w.upper() for w in WORDS__0], torch.tensor([len(w) for w in WORDS__0])

    torch.jit.save(torch.jit.script(Strings()), str(output))


def torch_dict_input(output: Path, library: str | None = None) -> None:
    """One Dict[str, Tensor] argument: the inputs by name."""
    import torch

    class Difference(torch.nn.Module):
        def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            return inputs["minuend"] - inputs["subtrahend"]

    torch.jit.save(torch.jit.script(Difference()), str(output))


def tf_zero_out_savedmodel(output: Path, library: str) -> None:
    import tensorflow as tf

    zero_out = tf.load_op_library(library).zero_out

    class ZeroOut(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.int32, name="to_zero")])
        def serve(self, to_zero):
            return {"zeroed": zero_out(to_zero)}

    module = ZeroOut()
    tf.saved_model.save(module, str(output), signatures={"serving_default": module.serve})


def tf_zero_out_graphdef(output: Path, library: str) -> None:
    import tensorflow as tf

    zero_out = tf.load_op_library(library).zero_out
    graph = tf.Graph()
    with graph.as_default():
        value = tf.compat.v1.placeholder(tf.int32, [None, 4], name="INPUT0")
        tf.identity(zero_out(value), name="OUTPUT0")
    output.write_bytes(graph.as_graph_def().SerializeToString())


def tf_add_sub_savedmodel(output: Path, library: str | None = None) -> None:
    """Two signatures: `serving_default` adds and subtracts; `scaled` multiplies by 10."""
    import tensorflow as tf

    class AddSub(tf.Module):
        @tf.function(
            input_signature=[
                tf.TensorSpec([None, 4], tf.float32, name="a"),
                tf.TensorSpec([None, 4], tf.float32, name="b"),
            ]
        )
        def add_sub(self, a, b):
            return {"sum": a + b, "difference": a - b}

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def scaled(self, x):
            return {"y": x * 10.0}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
        def upper(self, text):
            return {"upper": tf.strings.upper(text)}

    module = AddSub()
    signatures = {"serving_default": module.add_sub, "scaled": module.scaled, "upper": module.upper}
    tf.saved_model.save(module, str(output), signatures=signatures)


GENERATORS = {
    "torch_modulo": torch_modulo,
    "torch_add_one": torch_add_one,
    "torch_twice_plus_one": torch_twice_plus_one,
    "torch_nested_ops": torch_nested_ops,
    "torch_add_sub": torch_add_sub,
    "torch_double": torch_double,
    "torch_accumulator": torch_accumulator,
    "torch_strings": torch_strings,
    "torch_dict_input": torch_dict_input,
    "tf_zero_out_savedmodel": tf_zero_out_savedmodel,
    "tf_zero_out_graphdef": tf_zero_out_graphdef,
    "tf_add_sub_savedmodel": tf_add_sub_savedmodel,
}

if __name__ == "__main__":
    kind, output, *rest = sys.argv[1:]
    GENERATORS[kind](Path(output), *rest)  # type: ignore[operator]
