#!/bin/bash
# Fills .whl/ (git-ignored) with the py3.12 wheels a lent GPU machine lacks, for the `device` tool's carry:
# the service's (fastapi, uvicorn and their dependencies, pydantic-settings, httptools, uvloop), gguf (the shipped
# model's conversion) and liger-kernel (the decode copies' Triton kernels: without it the fused layers fall back to
# torch ops, and the decode step is ~45% slower on the H200, as a run of 2026-12-02 found), and py-spy (for
# bench/gpu_serving.py --py-spy). ~12.3 MB, well under a call's 64 MiB. Usage: bash bench/carry_wheels.sh, then name .whl in the call's carry.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --dest .whl --only-binary=:all: --python-version 3.12 --no-deps \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 --platform any \
  fastapi starlette uvicorn pydantic pydantic_core pydantic-settings python-dotenv typing-inspection annotated-types \
  annotated-doc gguf typing_extensions anyio click h11 opentelemetry-api importlib-metadata zipp httpx-aiohttp \
  httptools uvloop "liger-kernel>=0.8.5,<0.9" py-spy
ls .whl
