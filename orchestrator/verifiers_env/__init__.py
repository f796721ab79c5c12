"""The project's problems and rewards as a `verifiers` environment (needs the `verifiers` extra)."""
