"""The KServe V2 gRPC protocol: Triton's `inference.GRPCInferenceService`."""

from opserve.frontends.grpc.servicer import InferenceServicer, start_grpc_server

__all__ = ["InferenceServicer", "start_grpc_server"]
