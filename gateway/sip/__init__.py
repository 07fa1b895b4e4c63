"""SIP, sans-IO: messages, server/client transactions, and the bridge from calls to pushes."""
