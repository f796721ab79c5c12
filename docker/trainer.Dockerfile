# syntax=docker/dockerfile:1.7
# The trainer: the student (4-bit base + LoRA) served over the OpenAI API and trained by /grpo/step.
#   docker build -f docker/trainer.Dockerfile -t alphazero-llm-trainer/trainer .
#   docker build ... --build-arg TRAINER_BACKEND=unsloth     (the default backend baked into the image)
# The image holds both backends: transformers + peft + bitsandbytes, and Unsloth; TRAINER_BACKEND picks one at
# start (compose passes it through from .env). The default is the backend the GPU figures back (docs/deployment.md).
# Torch comes from the PyTorch CUDA index at a pinned version; the CUDA runtime libraries ship inside its wheels,
# and the host's driver arrives through the NVIDIA container toolkit.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS base
# gcc + libc headers: Triton (under Unsloth's kernels) compiles a small launcher on first use.
# The base image's tag pins the distribution, and with it these packages' versions.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

FROM base AS build
ARG TORCH_VERSION=2.13.0
# torchvision (an Unsloth requirement) pins one torch exactly; from the same index, so its CUDA build matches.
ARG TORCHVISION_VERSION=0.28.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" --index-url "${TORCH_INDEX_URL}" \
    && printf 'torch==%s\ntorchvision==%s\n' "${TORCH_VERSION}" "${TORCHVISION_VERSION}" > constraints.txt
# Dependencies (base + the gpu extra) from pyproject.toml alone, so that a change of code reuses this layer.
# The torch constraint keeps Unsloth from swapping the CUDA torch for another build; trainer-constraints.txt pins
# the rest to the exact set checked against Unsloth's declared ranges (tests/deploy/test_gpu_pins.py).
COPY pyproject.toml docker/trainer-constraints.txt ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['gpu']))" \
        > requirements.txt \
    && pip install -r requirements.txt -c constraints.txt -c trainer-constraints.txt
COPY README.md ./
COPY services ./services
COPY docker/select_packages.py ./
RUN python select_packages.py && pip install --no-cache-dir --no-deps --no-compile .

FROM base
# unsloth (faster GRPO steps and less memory than transformers on an H200, both passing the CUDA tests:
# bench/RESULTS.md, "Backends side by side") or transformers; see the header.
ARG TRAINER_BACKEND=unsloth
RUN useradd --create-home --uid 1000 --user-group app \
    && mkdir -p /cache/models /cache/huggingface /data/checkpoints \
    && chown -R app:app /cache /data
COPY --from=build /opt/venv /opt/venv
# No secret has a default here: HF_TOKEN and any API token arrive at run time through the environment.
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    TRAINER_HOST=0.0.0.0 TRAINER_PORT=8001 TRAINER_BACKEND=${TRAINER_BACKEND} \
    TRAINER_MODEL_CACHE_DIR=/cache/models TRAINER_CHECKPOINT_DIR=/data/checkpoints
USER 1000:1000
WORKDIR /home/app
EXPOSE 8001
HEALTHCHECK --interval=15s --timeout=10s --start-period=15m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('TRAINER_PORT', '8001'), timeout=5)"]
CMD ["python", "-m", "services.trainer"]
