"""HTTP clients: the OpenAI-compatible pool and its lean transport, the trainer's own routes, this service's API."""
