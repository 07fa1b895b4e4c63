"""What the benchmarks push: the topic, and the stamp a timed push carries."""

TOPIC = "com.example.bench"
# A push whose payload carries this key (time.monotonic_ns() when the publisher wrote it)
# is timed at the device: CLOCK_MONOTONIC is one clock for every process on the machine.
STAMP = "bench_t"
STAMPED = '{"aps":{"alert":"Bed 12 calls"},"ward":3,"' + STAMP + '":%d}'  # % monotonic_ns()
