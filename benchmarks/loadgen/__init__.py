"""The load generator: lean KSW1, plain TCP and raw WebSocket clients in their own
processes, driven by the suite (see benchmarks/README.md, "The load generator")."""
