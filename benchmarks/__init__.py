"""The ksw1fast benchmark suite: `python -m benchmarks run [--quick] [--out DIR]`.

Every scenario runs on loopback against servers and targets the suite starts itself:
the gateway (compiled and pure-Python), socat and websockify as baselines, loopback
TCP targets, and load-generator processes that speak KSW1 (or plain TCP, or raw
WebSocket) with little Python per byte.  See benchmarks/README.md.
"""
