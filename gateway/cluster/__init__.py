"""A site of several gateways on NATS JetStream (docs/cluster.md); off unless configured.

Importing this package does not import the NATS client: a one-box install never loads it.
"""


class SiteUnavailable(Exception):
    """The site's NATS cannot be reached or used: the gateway does not start (it must not
    make tokens of its own while its site's are unknown)."""
