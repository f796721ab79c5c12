"""The trainer's decode engine: rows in fixed KV-cache slots, prompt prefixes reused across requests, and on CUDA
each decode step replayed as a captured CUDA graph (engine.py tells the whole story)."""

from .engine import DecodeConfig, DecodeEngine

__all__ = ["DecodeConfig", "DecodeEngine"]
