"""What the benchmarks share: the machine (host), simulated devices (devices), MQTT."""
