# The same environment as `make venv`: CPU torch from PyTorch's CPU index, then mlpruning.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
WORKDIR /opt/mlpruning

RUN apt-get update && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
RUN python -m pip install --upgrade pip \
    && python -m pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY mlpruning ./mlpruning
COPY pipeline ./pipeline
COPY graph_passes ./graph_passes
COPY deploy ./deploy
RUN python -m pip install ".[serve]"

COPY tests ./tests
ENTRYPOINT ["mlpruning"]
CMD ["--help"]
