"""Running the gateway in production: worker processes and their supervisor, child
processes that import this very package, metrics, health endpoints and logs."""
