#!/usr/bin/env bash
# Provision an NVIDIA Jetson (Orin; JetPack 6.x = L4T r36, Ubuntu 22.04) as a ctriage appliance: like
# provision-nuc.sh, plus ONNX Runtime with the CUDA and TensorRT execution providers, GPU device access for the
# service and a TensorRT engine cache. Idempotent; --dry-run prints the plan and changes nothing.
#
#   sudo firmware_scripts/provision-jetson.sh --device-id ct-room-2 --broker-url mqtts://broker.hospital.lan:8883 \
#        --ca-file ca.crt --mqtt-password-file ct-room-2.mqtt-password --wheel dist/ctriage-0.1.0-py3-none-any.whl
#
# ONNX Runtime GPU: the Jetson AI Lab build for JetPack 6 / CUDA 12.6 (https://pypi.jetson-ai-lab.io/jp6/cu126),
# pinned by version and sha256 below; --ort-wheel FILE|URL installs another (e.g. a local copy, offline).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/lib/common.sh
. "$HERE/lib/common.sh"
# shellcheck source=SCRIPTDIR/lib/provision.sh
. "$HERE/lib/provision.sh"

BOX=jetson
BOX_DESCRIPTION="NVIDIA Jetson (JetPack 6 / L4T r36)"
CONFIG_EXAMPLE="$REPO/config/site-jetson.example.toml"
BOX_PACKAGES=()
BOX_GROUPS="video"
# JetPack 6 ships Python 3.10, and the Jetson ONNX Runtime GPU wheels for it are cp310.
PY_MIN=10
ORT_GPU_INDEX="https://pypi.jetson-ai-lab.io/jp6/cu126/+f/4eb/e6a8902dc7708"
ORT_GPU_SHA256="4ebe6a8902dc7708434b2e1541b3fe629ebf434e16ab5537d1d6a622b42c622b"
ORT_GPU_WHEEL="$ORT_GPU_INDEX/onnxruntime_gpu-1.23.0-cp310-cp310-linux_aarch64.whl#sha256=$ORT_GPU_SHA256"

args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --ort-wheel) ORT_GPU_WHEEL="${2:?--ort-wheel needs a file or URL}"; shift 2 ;;
        -h|--help)
            provision_usage
            echo "  --ort-wheel FILE|URL        onnxruntime-gpu wheel (default: the pinned Jetson AI Lab build)"
            exit 0 ;;
        *) args+=("$1"); shift ;;
    esac
done

# The venv's Python must match the wheel's cp3XY tag (python3.10 for the pinned JetPack 6 build).
if [[ "$ORT_GPU_WHEEL" =~ -cp3([0-9]+)-cp3 ]]; then
    PYTHON_CMD="python3.${BASH_REMATCH[1]}"
    BOX_PACKAGES+=("$PYTHON_CMD-venv")
fi

box_checks() {
    local arch release
    arch="$(uname -m)"
    release="$(head -n1 /etc/nv_tegra_release 2>/dev/null || true)"
    if [[ "$arch" != aarch64 || "$release" != *"R36"* ]]; then
        [[ "$DRY_RUN" == 1 ]] || die "not a JetPack 6 Jetson (arch $arch, /etc/nv_tegra_release: '${release:-absent}')"
        warn "not a JetPack 6 Jetson (arch $arch, L4T '${release:-absent}'); dry run continues"
    else
        info "L4T: $release"
    fi
    if command -v nvpmodel >/dev/null 2>&1; then
        info "power mode: $(nvpmodel -q 2>/dev/null | head -n1) (steady latency: the highest mode, see DEPLOYMENT.md)"
    fi
}

box_packages() {
    # CUDA 12, cuDNN 9 and TensorRT 10 runtimes come with JetPack; a minimal flash may lack them.
    local lib absent=0
    for lib in libcudart.so.12 libcudnn.so.9 libnvinfer.so.10; do
        ldconfig -p 2>/dev/null | grep -q "$lib" || { info "missing $lib"; absent=1; }
    done
    if [[ $absent == 1 ]]; then
        apt_install nvidia-jetpack-runtime
    else
        info "CUDA, cuDNN and TensorRT runtimes present"
    fi
}

box_install_args() {
    # numpy<2: safe with ONNX Runtime builds made against either NumPy 1.x or 2.x.
    EXTRA_INSTALL_ARGS+=(--ort-gpu "$ORT_GPU_WHEEL" --pip-arg "numpy<2")
}

box_units() {
    # so that a later `update-appliance.sh NEW.whl` installs the same GPU build without extra options
    printf '# defaults for update-appliance.sh on this Jetson\nORT_GPU=%s\nPIP_ARG=numpy<2\n' "$ORT_GPU_WHEEL" \
        | write_file "$ETC/update.conf" 0644 root:root
    ensure_dir "$SYSTEMD/ctriage.service.d" 0755 root:root
    install_file "$FIRMWARE/systemd/jetson.conf" "$SYSTEMD/ctriage.service.d/jetson.conf" 0644 root:root
    ensure_dir "$STATE/trt-cache" 0750 ctriage:ctriage
}

provision_main "${args[@]}"
