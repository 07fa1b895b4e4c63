"""lpgw: a local push gateway for Apple Local Push Connectivity."""

__version__ = "0.1.0"
