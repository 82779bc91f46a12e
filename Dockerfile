# One image for every role (dealer, party0, party1, client); docker-compose.yml picks each one's command.
#
# Default route: python:3.11-slim from Docker Hub and CPU-only torch from PyTorch's CPU index (the PyPI wheel for
# Linux pulls several GB of CUDA libraries), every other package from PyPI.
# Offline route, for machines without Docker Hub (docker/offline.yml; `make compose-demo` picks it by itself):
#   BASE_IMAGE=mpcache-base:bookworm   a base image made from Debian packages (docker/base-image.sh)
#   PIP_FLAGS=--no-index               every package from docker/wheels, filled on the host with the host's pip
#                                      (and its index, certificates, CPU torch wheel): the build itself never
#                                      touches the network, so nothing of the host's pip setup lands in the image.
# PIP_FLAGS can also name another package index (--index-url URL). docker/wheels is bind-mounted into the pip
# steps, never copied into the image (an empty folder on the default route).
# No model weights go into the image: party 0 gets its model as a read-only volume (docker-compose.yml).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG PIP_FLAGS=

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 GRPC_VERBOSITY=NONE OMP_NUM_THREADS=1
WORKDIR /app

RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    pip install $PIP_FLAGS --find-links /wheels --index-url "$TORCH_INDEX" torch==2.13.0

# Dependencies before the sources, so a code change rebuilds only the last layers (seconds); CrypTen without its
# broken metadata (it pins the dead `sklearn` package and a CUDA torch; see mpcache/mpc/arith/crypten_compat.py).
COPY pyproject.toml ./
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install $PIP_FLAGS --find-links /wheels -r /tmp/requirements.txt "setuptools>=68" wheel \
    && pip install $PIP_FLAGS --find-links /wheels --no-deps crypten==0.4.1

COPY README.md ./
COPY protos ./protos
COPY mpcache ./mpcache
COPY parties ./parties
COPY bench ./bench
RUN pip install --no-index --no-deps --no-build-isolation . && rm -rf build

# An unprivileged user; the mount points of the per-role volumes (docker-compose.yml) belong to it, so fresh
# volumes do too.
RUN useradd --create-home --uid 10001 mpc \
    && mkdir -p /certs /model /pki/ca /pki/dealer /pki/party0 /pki/party1 /pki/client \
    && chown -R mpc /certs /pki
USER mpc
EXPOSE 50700 50701 50702 50711 50712
CMD ["mpcache-launch", "--help"]
