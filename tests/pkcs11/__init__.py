"""PKCS#11 tests. A package so that its conftest.py does not shadow tests/conftest.py,
which the top-level test modules import as `conftest`."""
