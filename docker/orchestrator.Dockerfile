# syntax=docker/dockerfile:1.7
# The orchestrator: async MCTS + the REST API. Slim on purpose: the package's base dependencies only, no torch.
#   docker build -f docker/orchestrator.Dockerfile -t alphazero-llm-trainer/orchestrator .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies from pyproject.toml alone, so that a change of code reuses this layer and its downloads.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && pip install -r requirements.txt
COPY README.md ./
COPY orchestrator ./orchestrator
# Of services/, only what the orchestrator imports: the trainer's wire protocol and the shared body limit.
COPY services/__init__.py services/body_limit.py ./services/
COPY services/protocol ./services/protocol
COPY docker/select_packages.py ./
RUN python select_packages.py \
    && pip install --no-cache-dir --no-deps --no-compile . \
    && python -c "import sys, orchestrator.cli, services.protocol; assert 'torch' not in sys.modules, 'the orchestrator must not import torch'"

FROM ${PYTHON_IMAGE}
RUN useradd --create-home --uid 1000 --user-group app \
    && mkdir -p /data/runs && chown -R app:app /data
COPY --from=build /opt/venv /opt/venv
# No secret has a default here: keys arrive at run time through the environment (compose.yaml / .env).
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 HOST=0.0.0.0 PORT=8000 DATA_DIR=/data/runs
USER 1000:1000
WORKDIR /home/app
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=5)"]
CMD ["azt", "serve"]
