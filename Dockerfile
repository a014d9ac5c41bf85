# syntax=docker/dockerfile:1.7
# BBQRec-serve images. Targets:
#   cpu       python slim + onnxruntime ([serve] extra), no torch           (docker build --target cpu .)
#   gpu       CUDA/cuDNN runtime + onnxruntime-gpu ([gpu] extra), no torch  (docker build --target gpu .)
#   loadtest  the cpu dependencies + locust, for deploy/loadtest            (docker build --target loadtest .)
# The bundle is served from /bundle: mount one there, or bake one in with
#   --build-arg BUNDLE=runs/bundles/scientific_mm   (a path inside the build context).
# Dependencies come from pyproject.toml alone and are installed before any source is copied.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# onnxruntime-gpu wheels target CUDA 12 with cuDNN 9; Ubuntu 24.04 brings Python 3.12.
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
ARG BUNDLE=deploy/bundle

# -- dependency layers ----------------------------------------------------------------------------

FROM ${PYTHON_IMAGE} AS cpu-deps
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
COPY pyproject.toml deploy/docker/requirements.py /build/
RUN python /build/requirements.py /build/pyproject.toml serve > /build/requirements.txt \
    && pip install -r /build/requirements.txt

FROM ${CUDA_IMAGE} AS gpu-deps
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
COPY pyproject.toml deploy/docker/requirements.py /build/
RUN python /build/requirements.py /build/pyproject.toml gpu > /build/requirements.txt \
    && pip install -r /build/requirements.txt

# -- the project itself, as a wheel (pure Python: one wheel serves both bases) --------------------

FROM cpu-deps AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service
COPY training ./training
RUN pip wheel --no-deps -w /wheels .

FROM scratch AS bundle
ARG BUNDLE
COPY ${BUNDLE}/ /bundle/

# -- runtime targets ------------------------------------------------------------------------------

FROM cpu-deps AS cpu
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/app app \
    && install -d -o app -g app /app /app/data
COPY --from=wheel /wheels /wheels
RUN pip install --no-deps /wheels/*.whl && rm -rf /wheels
COPY --from=bundle --chown=app:app /bundle /bundle
WORKDIR /app
USER 10001:10001
ENV BBQREC_DATA_DIR=/app/data BBQREC_PROVIDER=cpu
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["bbqrec", "serve", "--bundle", "/bundle", "--host", "0.0.0.0", "--port", "8000"]

FROM gpu-deps AS gpu
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/app app \
    && install -d -o app -g app /app /app/data
COPY --from=wheel /wheels /wheels
RUN pip install --no-deps /wheels/*.whl && rm -rf /wheels
COPY --from=bundle --chown=app:app /bundle /bundle
WORKDIR /app
USER 10001:10001
# cuda: readiness fails loudly when the CUDA provider is not the one ONNX Runtime actually uses.
ENV BBQREC_DATA_DIR=/app/data BBQREC_PROVIDER=cuda
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["bbqrec", "serve", "--bundle", "/bundle", "--host", "0.0.0.0", "--port", "8000"]

FROM cpu-deps AS loadtest
COPY --from=wheel /wheels /wheels
RUN python /build/requirements.py /build/pyproject.toml dev locust > /build/locust.txt \
    && pip install -r /build/locust.txt \
    && pip install --no-deps /wheels/*.whl && rm -rf /wheels \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/app app
USER 10001:10001
WORKDIR /mnt/loadtest
ENTRYPOINT ["locust"]
