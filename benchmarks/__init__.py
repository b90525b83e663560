"""Throughput benchmarks of the ksw1fast gateway: `python -m benchmarks --help`.

The gateway runs as a subprocess (compiled and pure-Python), loopback TCP
targets run in another process, and this process is the KSW1 client.
"""
