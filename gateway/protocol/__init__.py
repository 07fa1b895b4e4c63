"""The lpgw/1 device protocol, sans-IO: framing, messages and session state machines."""

ALPN = "lpgw/1"
VERSIONS = (1,)
