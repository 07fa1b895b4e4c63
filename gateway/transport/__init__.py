"""asyncio shells: sockets in, bytes to the sans-IO sessions, bytes back out."""
