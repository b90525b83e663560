"""The baselines each scenario is compared with in the same run: socat and websockify."""
