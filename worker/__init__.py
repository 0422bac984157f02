"""The worker: a continuous-batching engine (worker.engine) wrapped by a Redis queue loop."""
