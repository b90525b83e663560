"""The KSW1 protocol, free of I/O (docs/protocol.md §1-§8, §11): constants, messages and
errors, the frame and payload codecs, the close-handshake rules, and the session rules
of one connection: bytes and frames in, frames and actions out."""
