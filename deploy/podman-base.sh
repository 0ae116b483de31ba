#!/usr/bin/env bash
# A local base image for deploy/Dockerfile where no container registry is reachable:
# Debian bookworm from debootstrap (the Debian mirror is enough) with Python 3.11, imported
# into podman's local storage. Does nothing when the image exists already; else it takes
# about 3 minutes. Run as root (debootstrap).
#
#   deploy/podman-base.sh [IMAGE]        # IMAGE: localhost/issuer-base:bookworm
#   podman build --build-arg BASE_IMAGE=localhost/issuer-base:bookworm ...
#
# DEBIAN_MIRROR overrides debootstrap's default mirror. The official python image sets the
# same PATH and LANG.
set -euo pipefail
image=${1:-localhost/issuer-base:bookworm}
if podman image exists "$image"; then
    echo "$image exists"
    exit 0
fi
root=$(mktemp -d /var/tmp/issuer-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
# python3-venv: the image makes its venv with `python3 -m venv` (and the pip bundled there).
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" ${DEBIAN_MIRROR:+"$DEBIAN_MIRROR"} >/dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | podman import --quiet \
    --change 'ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV=LANG=C.UTF-8' \
    --change 'CMD=["/bin/bash"]' \
    - "$image" >/dev/null
echo "$image imported"
