"""The domain: devices and tokens, store-and-forward delivery. No sockets, no clocks."""
