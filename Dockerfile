# syntax=docker/dockerfile:1
# The Caveat server image: Python 3.11, torch (CPU by default, CUDA with VARIANT=cuda), the pinned stack of
# pyproject.toml, the embedded MiniLM and datasets (so the stack needs no hub), bundles on a volume.
#   docker build -t caveat:cpu .
#   docker build --build-arg VARIANT=cuda -t caveat:cuda .
#   docker build --build-arg BASE_IMAGE=mirror.example/python:3.11-slim-bookworm .   (a local mirror)
# Python packages come from docker/wheelhouse/ when it holds wheels (offline builds: docker/smoke.sh), else
# from the package indexes.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# optional extras, comma-separated: store (S3 bundle stores), ray (caveat-serve --engine ray; the RayService image)
ARG EXTRAS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY docker/wheelhouse/ /wheels/
COPY pyproject.toml README.md ./
COPY requirements/ requirements/
COPY adapters/ adapters/
COPY training/ training/
COPY service/ service/
# torch first, from the wheelhouse or the index of its variant, so that nothing later swaps the build;
# then the project with exactly pyproject's pins, then the --no-deps set (laplace-torch & co., the assets).
# hadolint ignore=SC2086
RUN python3 -m venv /opt/caveat \
    && if ls /wheels/*.whl > /dev/null 2>&1; then torch_source="--no-index --find-links /wheels"; \
         rest_source="$torch_source"; \
       elif [ "${VARIANT}" = "cpu" ]; then torch_source="--index-url ${TORCH_CPU_INDEX}"; rest_source=""; \
       else torch_source=""; rest_source=""; fi \
    && /opt/caveat/bin/pip install $torch_source "torch==${TORCH_VERSION}" \
    && /opt/caveat/bin/pip install $rest_source ".${EXTRAS:+[$EXTRAS]}" \
    && /opt/caveat/bin/pip install $rest_source --no-deps -r requirements/nodeps.txt \
    && if /opt/caveat/bin/pip show torchvision > /dev/null 2>&1; then echo "torchvision must not be installed"; exit 1; fi

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="caveat" \
      org.opencontainers.image.description="Calibrated predictions from Bayesian LoRA-XS adapters" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 caveat \
    && useradd --system --uid 10001 --gid caveat --home-dir /home/caveat --create-home caveat \
    && mkdir -p /bundles && chown caveat:caveat /bundles
COPY --from=build /opt/caveat /opt/caveat
# (TOKENIZERS_PARALLELISM is no secret: hadolint flags the word TOKEN)
# hadolint ignore=DL3064
ENV PATH=/opt/caveat/bin:${PATH} \
    HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 \
    CAVEAT_HOST=0.0.0.0 CAVEAT_PORT=8000 CAVEAT_ADAPTER_DIR=/bundles
VOLUME ["/bundles"]
USER 10001:10001
WORKDIR /home/caveat
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('CAVEAT_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["caveat-serve"]
