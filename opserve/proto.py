"""Triton's official protobuf messages, from the generated modules that `tritonclient` ships.

Importing them here keeps the source of the generated code in one place.
"""

from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

ModelConfig = model_config_pb2.ModelConfig

__all__ = ["ModelConfig", "model_config_pb2", "service_pb2", "service_pb2_grpc"]
