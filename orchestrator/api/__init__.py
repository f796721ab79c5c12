"""The REST API: a thin HTTP layer (routers, auth and limits, response bodies) over the job manager."""
