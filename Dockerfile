# The torch-free serving image: `qconv serve` of an exported model mounted at /models/reranker.
#
#   docker build -t qconv-serve .
#   export QCONV_API_KEY=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')
#   docker run --rm -p 8000:8000 -e QCONV_API_KEY -v "$PWD/out/onnx:/models/reranker:ro" qconv-serve
#   docker run --rm -p 8000:8000 -e QCONV_API_KEY -v "$PWD/out/onnx:/models/reranker:ro" qconv-serve \
#       /models/reranker --host 0.0.0.0 --port 8000 --threads 4 --max-length 1024
#
# The API key comes from the environment (`-e QCONV_API_KEY` passes the caller's value; unlike an
# argument it does not show in `ps`, though `docker inspect` lists the container's environment), or
# from a mounted secret file with `-e QCONV_API_KEY_FILE=/run/secrets/qconv_api_key` (nothing to
# inspect); never bake it into the image with ENV.
# Clients send `Authorization: Bearer $QCONV_API_KEY`; /health (the HEALTHCHECK) stays open. Without a
# key the server warns at start-up that anyone reaching the port can score. Model management
# (/v1/models/load, /unload) stays off unless the command adds --allow-model-dir DIR.
#
# The install is `make serve-venv`'s: qconv[serve] pinned by constraints.txt (onnxruntime, fastapi, uvicorn,
# prometheus-client; no torch, no transformers). Arguments after the image name replace CMD (keep
# --host 0.0.0.0 and port 8000, which HEALTHCHECK calls). Replicas of this image hold no state: scale out
# behind a load balancer (docs/serving.md).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY qwen_convert ./qwen_convert
RUN pip install -c constraints.txt '.[serve]' \
    && ! python -c "import torch" 2>/dev/null \
    && cd / && rm -rf /src \
    && useradd --system --no-create-home --uid 10001 qconv

USER qconv
WORKDIR /models
VOLUME ["/models"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
# SIGTERM (docker stop) drains in-flight requests; give it longer than the default 10 s: docker stop -t 40.
STOPSIGNAL SIGTERM
ENTRYPOINT ["qconv", "serve"]
CMD ["/models/reranker", "--host", "0.0.0.0", "--port", "8000"]
