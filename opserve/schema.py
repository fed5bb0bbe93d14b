"""What a model accepts and returns, precomputed from its config for per-request validation."""

from __future__ import annotations

from dataclasses import dataclass, field

from opserve.datatypes import config_to_v2
from opserve.memo import remember
from opserve.proto import ModelConfig, model_config_pb2

VALIDATED = 256  # request signatures a schema remembers as valid


@dataclass(frozen=True, slots=True)
class TensorSchema:
    name: str
    datatype: str  # V2 name
    dims: tuple[int, ...]  # as the client sees them, without the batch dimension
    reshape: tuple[int, ...] | None  # as the model sees them, when the config reshapes
    optional: bool = False

    def shape_matches(self, shape: tuple[int, ...]) -> bool:
        if len(shape) != len(self.dims):
            return False
        return all(want == -1 or want == got for want, got in zip(self.dims, shape, strict=True))


@dataclass(frozen=True, slots=True)
class ModelSchema:
    max_batch_size: int
    inputs: dict[str, TensorSchema]
    outputs: dict[str, TensorSchema]
    decoupled: bool = False  # model_transaction_policy.decoupled
    batching: bool = field(init=False)  # max_batch_size > 0 (read several times per request)
    required_inputs: frozenset[str] = field(init=False)
    reshaped_outputs: bool = field(init=False)  # an output's config reshapes it
    # request signatures (`InferenceRequest.signature`) whose requests passed the checks against
    # this schema, with the input shapes the model wants (None: as the client gave them); a
    # schema is made anew when its model's config changes, and forgets them with it
    validated: dict[object, tuple[tuple[int, ...], ...] | None] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "batching", self.max_batch_size > 0)
        required = frozenset(n for n, t in self.inputs.items() if not t.optional)
        object.__setattr__(self, "required_inputs", required)
        reshaped = any(t.reshape is not None for t in self.outputs.values())
        object.__setattr__(self, "reshaped_outputs", reshaped)
        object.__setattr__(self, "validated", {})

    def remember_valid(self, signature: object, shapes: tuple[tuple[int, ...], ...] | None) -> None:
        """The requests of `signature` passed the checks (the oldest of `VALIDATED` forgotten)."""
        remember(self.validated, signature, shapes, VALIDATED)

    @classmethod
    def from_config(cls, config: ModelConfig) -> ModelSchema:
        def tensor(t, optional: bool) -> TensorSchema:
            reshape = tuple(t.reshape.shape) if t.HasField("reshape") else None
            return TensorSchema(
                t.name,
                config_to_v2(model_config_pb2.DataType.Name(t.data_type)),
                tuple(t.dims),
                reshape,
                optional,
            )

        return cls(
            config.max_batch_size,
            {t.name: tensor(t, t.optional) for t in config.input},
            {t.name: tensor(t, False) for t in config.output},
            config.model_transaction_policy.decoupled,
        )

    def expected_shape(self, tensor: TensorSchema) -> str:
        dims = ((-1,) if self.batching else ()) + tensor.dims
        return "[" + ",".join(map(str, dims)) + "]"
