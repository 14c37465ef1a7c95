#!/usr/bin/env bash
# Everything a GPU machine has to check, in one go (about 10 minutes on one H100), from the repository root
# with the project installed:
#   1. the CUDA smoke test (device placement, half precision, a real out-of-memory error -> 503);
#   2. the benchmarks on ViT-B/16+ with random weights at bf16 (what `auto` picks on an H100): feature speed with a
#      LoRA folded vs run as a branch, training, HTTP latency, and mixed products (one forward with per-sample LoRA
#      deltas: gather / group / split) vs one product alone;
#   3. the feature forward through ONNX Runtime's CUDA execution provider, then its TensorRT provider (needs
#      onnxruntime-gpu, and TensorRT's libraries for the second; each skipped, not failed, where missing).
# Each step's output is also written to ${OUT:-gpu-results}/ so it can be copied into the README.
set -uo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-gpu-results}"
mkdir -p "$out"
status=0
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || { echo "no NVIDIA GPU visible"; exit 2; }
python -m pytest -q -rs tests/test_device_placement.py tests/test_core_precision.py tests/test_core_lora_fold.py \
    tests/test_core_mixed_batch.py tests/test_app_pixel_transfer.py 2>&1 | tee "$out/cuda-smoke.txt" \
    || status=1
python benchmarks/core_speed.py --precision bf16 --repeats 50 2>&1 | tee "$out/core-speed.md" || status=1
python benchmarks/mixed_batches.py --device cuda --precision bf16 --threads 4 --requests 32 \
    --backbones test:tiny-clip open_clip:ViT-B-16-plus-240:random 2>&1 | tee "$out/mixed-batches.md" || status=1
python benchmarks/train_speed.py 2>&1 | tee "$out/train-speed.md" || status=1
python benchmarks/http_latency.py --backbone open_clip:ViT-B-16-plus-240:random --device cuda \
    --requests 256 --concurrency 1 8 64 2>&1 | tee "$out/http-latency.md" || status=1
if python -c "import onnxruntime, sys; sys.exit('CUDAExecutionProvider' not in onnxruntime.get_available_providers())" \
        2>/dev/null; then
    python benchmarks/runtime_speed.py --backbone open_clip:ViT-B-16-plus-240:random --runtimes torch onnxruntime \
        --providers CUDAExecutionProvider CPUExecutionProvider --repeats 20 2>&1 | tee "$out/runtime-speed.md" \
        || status=1
else
    echo "ONNX Runtime CUDA execution provider not available: runtime step skipped" | tee "$out/runtime-speed.md"
fi
if python -c "import onnxruntime, sys; sys.exit('TensorrtExecutionProvider' not in onnxruntime.get_available_providers())" \
        2>/dev/null; then
    python benchmarks/runtime_speed.py --backbone open_clip:ViT-B-16-plus-240:random --runtimes torch onnxruntime \
        --providers TensorrtExecutionProvider CUDAExecutionProvider CPUExecutionProvider --repeats 20 2>&1 \
        | tee "$out/runtime-speed-tensorrt.md" || status=1
else
    echo "ONNX Runtime TensorRT execution provider not available: TensorRT step skipped" \
        | tee "$out/runtime-speed-tensorrt.md"
fi
exit "$status"
