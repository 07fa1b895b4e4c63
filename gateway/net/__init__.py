"""Discovery and interface tracking: the gateway's shell toward the local network.

`ifstate` is the pure model and policy; `netwatch` fills it from netlink (or netifaces),
`discovery` advertises it with python-zeroconf, and `browse` is the phone's side.
"""
