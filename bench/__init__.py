"""pytest-benchmark scenarios for pserver (public API only); run ``pytest bench``.

Not collected by ``make test`` (pytest's testpaths is ``tests``).
"""
