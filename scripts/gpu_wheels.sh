#!/usr/bin/env bash
# Run HERE (with network to PyPI) before a GPU check on a machine that has none: packs the packages
# scripts/gpu_check.sh needs and a CUDA image lacks (libp2p and its dependencies, cryptography, gguf;
# for Python 3.12 on x86-64 Linux) into .gpu/site.tar.xz (ignored by git; carry `.gpu` to the GPU
# machine). torch, numpy, safetensors, tokenizers, tqdm and jinja2 are expected there. WebRTC (aiortc,
# PyAV: too large to carry) is left out: the check runs peers with --no-webrtc.
set -euo pipefail
cd "$(dirname "$0")/.."
PYV="${GPU_PYTHON_VERSION:-3.12}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
wheels=(libp2p==0.8.1 trio==0.35.0 multiaddr==0.2.0 coincurve==21.0.0 cryptography==50.0.2 gguf==0.19.0
    aioquic==1.7.2 async-generator==1.10 base58==2.1.1 blake3==1.0.11 cbor2==6.3.0 cffi==2.1.1 dnspython==2.9.2
    httpcore2==2.16.2 httpx2==2.16.2 importlib_metadata==10.2.0 lazy-importer==0.1.0 lru-dict==1.4.1
    miniupnpc==2.3.3 mmh3==5.3.1 morphys==1.0 netaddr==1.3.0 noiseprotocol==0.3.1 outcome==1.3.0.post0
    py-cid==0.5.0 py-multibase==2.0.0 py-multicodec==1.0.0 py-multihash==3.0.0 pycparser==3.12
    pycryptodome==4.4.0 pylsqpack==1.0.0 PyNaCl==1.6.2 pyOpenSSL==26.4.0 rpcudp==5.0.1 service-identity==26.1.0
    sniffio==1.3.1 trio-typing==0.10.0 trio-websocket==0.12.2 u-msgpack-python==2.8.0 wsproto==1.3.2
    zeroconf==0.150.5
    fastecdsa==3.0.1)  # libp2p pins 2.3.2, which has no wheel for 3.12; 3.0.1 keeps the API libp2p uses
platforms=()
for p in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${p}_x86_64")
done
echo "downloading ${#wheels[@]} wheels for Python $PYV" >&2
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    "${platforms[@]}" -d "$work/w" "${wheels[@]}"
python3 -m pip download -q --no-deps --no-binary=:all: -d "$work/s" varint==1.0.2 python-baseconv==1.2.2
mkdir -p "$work/site"
for f in "$work"/w/*.whl; do python3 -m zipfile -e "$f" "$work/site/"; done
for f in "$work"/s/*.tar.gz; do tar xzf "$f" -C "$work/s"; done
cp "$work"/s/varint-*/varint.py "$work"/s/python-baseconv-*/baseconv.py "$work/site/"
# what the check never loads: examples, self-tests, the MAC vendor databases
rm -rf "$work/site/examples" "$work/site/Crypto/SelfTest" "$work"/site/netaddr/eui/*.txt "$work"/site/netaddr/eui/*.idx
find "$work/site" -name __pycache__ -type d -prune -exec rm -rf {} +
mkdir -p .gpu
tar cJf .gpu/site.tar.xz -C "$work/site" .
bundle=$(stat -c %s .gpu/site.tar.xz)
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
echo "wrote .gpu/site.tar.xz: $((bundle / 1024)) KiB; with the tracked tree: $(((bundle + tree) / 1048576)) MiB of the 64 MiB a device call carries" >&2
