#!/usr/bin/env bash
# Puts the real Fashion-MNIST IDX files where torchvision's FashionMNIST class looks (<root>/FashionMNIST/raw),
# from Debian's package dataset-fashion-mnist (installed here if missing). No other network access.
set -euo pipefail
root=${1:-data}
raw="$root/FashionMNIST/raw"
names="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"
missing=0
for n in $names; do [ -s "$raw/$n" ] || missing=1; done
[ "$missing" = 0 ] && exit 0

if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "error: installing dataset-fashion-mnist needs root (or sudo)" >&2; exit 1; }
    sudo=sudo
  fi
  echo "installing Debian package dataset-fashion-mnist ..."
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

mkdir -p "$raw"
for n in $names; do
  src=$(dpkg -L dataset-fashion-mnist | grep "/$n.gz$" | head -n 1)
  [ -n "$src" ] || { echo "error: dataset-fashion-mnist does not list $n.gz" >&2; exit 1; }
  gunzip -c "$src" > "$raw/$n.part"
  mv "$raw/$n.part" "$raw/$n"
done
echo "Fashion-MNIST ready in $raw"
