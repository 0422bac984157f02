"""Code shared by the gateway, the worker and the CLI: settings, wire protocol, Redis keys."""
