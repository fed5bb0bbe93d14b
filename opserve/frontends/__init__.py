"""Frontends: the wire protocols. Each calls the protocol-free `DataPlane`."""
