"""The gateway: a thin FastAPI app that validates requests, enqueues them and relays tokens."""
