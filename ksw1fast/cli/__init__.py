"""The `ksw1fast` command: `serve`, `check-config`, `token issue`."""
