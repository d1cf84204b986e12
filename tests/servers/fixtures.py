"""pytest fixtures that start real servers on loopback (filled in by the servers work)."""
