"""The gateway's I/O shell: accepting, connections and their session, the relay of
stream data (compiled, with its pure-Python twin), and the embedding API."""
