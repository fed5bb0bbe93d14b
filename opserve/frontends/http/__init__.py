"""The KServe V2 HTTP/REST protocol with Triton's extensions."""

from opserve.frontends.http.app import HttpApp

__all__ = ["HttpApp"]
