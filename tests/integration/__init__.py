"""Integration tests: real `pserver serve` processes, ZeroMQ sockets and signals."""
