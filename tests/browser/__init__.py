"""Browser end-to-end tests. A package, so that its conftest is imported as
browser.conftest and does not take the bare name `conftest` from tests/conftest.py."""
