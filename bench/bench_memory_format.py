"""Why each architecture runs in the memory format it does (common.fast_memory_format, issue 27): milliseconds per
SGD step (batch 128, forward and backward) in the default format and in channels-last, measured in the same run,
as the plain CPU runs them and with oneDNN and ATen held to AVX2 (a CPU without AVX-512).

    python bench/bench_memory_format.py [--steps 15]

Each (kernel path) runs in its own process, the formats alternated twice. Writes results/bench/memory_format_cpu.*.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from summary import finish, markdown  # noqa: E402

ARCHS = {"LeNet5 (MNIST)": ("lenet5", {}, 1, 32), "VGG (the fusion parents')": ("vgg", {}, 3, 32),
         "ResNet18 at width 1/8": ("resnet", {"width": 0.125, "batch_norm": False, "bias": False}, 3, 32)}
MEASURE = """
import json, sys, time, torch
from archs import build_model
arch, kwargs, channels, size, steps = json.loads(sys.argv[1])
torch.manual_seed(0)
x, y = torch.randn(128, channels, size, size), torch.randint(0, 10, (128,))
times = {}
for fmt in ("default", "channels-last", "default", "channels-last"):
    model = build_model(arch, in_channels=channels, num_classes=10, **kwargs)
    memory = torch.channels_last if fmt == "channels-last" else torch.contiguous_format
    model, inputs = model.to(memory_format=memory), x.contiguous(memory_format=memory)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for step in range(steps + 3):
        if step == 3:
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(inputs), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    times.setdefault(fmt, []).append(1000 * (time.perf_counter() - start) / steps)
print(json.dumps({fmt: min(values) for fmt, values in times.items()}))
"""
PATHS = {"plain": {}, "AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    results = {}
    for path, extra in PATHS.items():
        for name, (arch, kwargs, channels, size) in ARCHS.items():
            done = subprocess.run([sys.executable, "-c", MEASURE, json.dumps([arch, kwargs, channels, size, args.steps])],
                                  cwd=ROOT, env={**os.environ, **extra, "PYTHONPATH": str(ROOT)}, capture_output=True,
                                  text=True, check=True)
            results[f"{name}, {path}"] = json.loads(done.stdout.strip().splitlines()[-1])
            print(name, path, results[f"{name}, {path}"], flush=True)
    load = os.getloadavg()[0]  # other work on the machine inflates both columns alike, not their ratio much
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, load average {load:.1f} at the end"
    rows = [[name, f"{r['default']:.1f}", f"{r['channels-last']:.1f}", f"{r['default'] / r['channels-last']:.2f}x"]
            for name, r in results.items()]
    table = markdown(["architecture, kernel path", "default format (ms/step)", "channels-last (ms/step)",
                      "channels-last speed-up"], rows,
                     f"Batch 128, SGD step with backward, best of two alternations; `python bench/bench_memory_format.py "
                     f"--steps {args.steps}`; {machine}, torch threads as the pipeline runs them.")
    return finish({"results": results, "machine": machine, "device": "cpu"}, "memory_format", table)


if __name__ == "__main__":
    main()
