#!/bin/sh
# The offline route's base image, for machines that cannot reach Docker Hub (python:3.11-slim is not pullable):
# Debian bookworm from Debian's own mirror (its python3 is 3.11, as in python:3.11-slim), with python3, venv and
# passwd installed as Debian packages by debootstrap, a virtual environment at /opt/venv first on PATH (so `python`
# and `pip` behave as in python:3.11-slim), packed into a Docker image with `docker import`. No CA bundle, proxy or
# other setting of this machine goes into it.
#
#   sudo docker/base-image.sh [TAG]          # default TAG mpcache-base:bookworm; ~45 s and ~160 MB
#
# Needs root (debootstrap, chroot), the debootstrap package and a running Docker engine. DEBIAN_MIRROR picks the
# mirror (default http://deb.debian.org/debian).
set -eu
TAG=${1:-mpcache-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
root=$(mktemp -d /tmp/mpcache-base.XXXXXX)
trap 'rm -rf "$root"' EXIT INT TERM

debootstrap --variant=minbase --include=python3,python3-venv,passwd bookworm "$root" "$MIRROR"
chroot "$root" python3 -m venv /opt/venv
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
    "$root"/usr/share/info/* "$root"/var/log/*.log
tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$TAG"
docker image ls "$TAG"
