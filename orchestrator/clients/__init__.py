"""HTTP clients: httpx over aiohttp (http.py), the OpenAI-compatible pool, the trainer's routes, this service's
API."""
