"""Real things for tests to talk to: a redis-server, misbehaving upstream servers."""
