"""What a gateway knows of its site that the core decides with: where devices are held.

The site's shell (gateway.cluster) keeps it up to date from the site's presence and
gateways buckets; the core only reads it, so a decision (is a push with expiration 0 for a
device connected somewhere? is a device quiet for a month really gone?) takes no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SiteView:
    site_id: str  # `welcome.gateway_id` on every gateway of the site: seqs are the site's
    holders: dict[str, str] = field(default_factory=dict)  # token -> gateway id holding it
    alive: set[str] = field(default_factory=set)  # gateway ids heard from lately

    def connected(self, token: str) -> bool:
        """Connected to a gateway of the site that is alive (as the site last said)."""
        holder = self.holders.get(token)
        return holder is not None and holder in self.alive

    def held(self) -> set[str]:
        return {token for token, gw in self.holders.items() if gw in self.alive}
