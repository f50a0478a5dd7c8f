# ct-denoise-node image.  CPU by default; `--build-arg EXTRAS=gpu` builds the CUDA worker
# image (onnxruntime-gpu with its CUDA/cuDNN wheels, replacing the CPU onnxruntime).
FROM python:3.11-slim-bookworm

ARG EXTRAS=""
ENV PYTHONUNBUFFERED=1 \
    TCP_NODELAY=1 \
    DENOISE_NODE_STATE_DIR=/var/lib/denoise-node \
    DENOISE_NODE_LOG_FORMAT=json

RUN apt-get update \
 && apt-get install -y --no-install-recommends dcmtk \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 1000 --home-dir /var/lib/denoise-node denoise \
 && mkdir -p /var/lib/denoise-node /spool && chown denoise /var/lib/denoise-node /spool

WORKDIR /opt/ct-denoise-node
COPY pyproject.toml README.md alembic.ini ./
COPY node node
COPY migrations migrations
RUN pip install --no-cache-dir . \
 && if [ "$EXTRAS" = "gpu" ]; then \
      pip uninstall -y onnxruntime && pip install --no-cache-dir ".[gpu]"; \
    fi \
 && python -c "from node.config import SHIPPED_MODEL; assert SHIPPED_MODEL.is_file(), SHIPPED_MODEL"

USER denoise
EXPOSE 11112 8080
HEALTHCHECK --interval=30s --timeout=5s CMD echoscu -aec DENOISE 127.0.0.1 11112 || exit 1
ENTRYPOINT ["denoise-node"]
CMD ["serve"]
