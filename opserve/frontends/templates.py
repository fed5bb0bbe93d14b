"""What the requests of one template share, for both frontends' templates (`http/templates`,
`grpc/templates`): a request decoded once, and the fields its successors take from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opserve.inference import InferenceRequest, Tensor


@dataclass(frozen=True, slots=True)
class SharedFields:
    """A decoded request's fields apart from its model and its tensors."""

    requested: tuple[str, ...] | None
    request_id: str
    parameters: tuple[tuple[str, Any], ...]  # copied into each request (the dataplane pops some)
    classification: tuple[tuple[str, int], ...]

    @classmethod
    def of(cls, request: InferenceRequest) -> SharedFields:
        requested = request.requested_outputs
        return cls(
            None if requested is None else tuple(requested),
            request.id,
            tuple(request.parameters.items()),
            tuple((request.classification or {}).items()),
        )

    def request(
        self, model_name: str, model_version: str, inputs: list[Tensor], signature: object
    ) -> InferenceRequest:
        """A request of its own with these fields (lists and dictionaries copied)."""
        request = InferenceRequest(
            model_name,
            model_version,
            inputs,
            None if self.requested is None else list(self.requested),
            self.request_id,
            dict(self.parameters),
        )
        if self.classification:
            request.classification = dict(self.classification)
        request.signature = signature
        return request
