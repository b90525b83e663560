"""What the gateway enforces: tokens, the upgrade request's Origin and token carriers,
the egress policy, name resolution safe for it, and the real client address."""
