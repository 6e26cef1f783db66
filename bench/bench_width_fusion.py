"""What fusing two parents of different widths costs (issue 30's target: under 90 s on 2 CPU cores), against one
forward pass of the two parents over the fusion samples, measured in the same run.

    python bench/bench_width_fusion.py [--repeats 2] [--device cpu]

The pairs are issue 30's: a ResNet34 at width 1/8 with a ResNet18 at 1/16 (CLAFusion into the ResNet18's widths at
the ResNet34's depth,
200 fusion samples, CLAFusion's number), and a VGG of double width (conv 32-M-64-M-128-M, 256 hidden) with one of
half width (8-M-16-M-32-M, 64 hidden) (OTFusion with activation costs and CLAFusion into the small one's shape, 400
fusion samples, fusion_kd.yaml's), each with and without REPAIR. The parents are untrained and the samples random
CIFAR-shaped images: what a fusion costs does not depend on what the parents learnt. Each time is the best of
``--repeats`` runs of alignment, averaging and (with REPAIR) renormalisation. The last line is a JSON summary, also
written with a Markdown table under results/bench/.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch
from summary import best_time, finish, markdown  # bench/ is on sys.path when a benchmark runs as a script

import fusion
from archs import build_model
from common import resolve_device

TARGET_S = 90.0
RESNET = {"depth": None, "batch_norm": False, "bias": False}
PAIRS = {
    "ResNet34 (1/8) + ResNet18 (1/16)": ("resnet", [dict(RESNET, depth=34, width=0.125),
                                                    dict(RESNET, depth=18, width=0.0625)], 200,
                                         [("clafusion", {"target": 1})]),
    "VGG double + half width": ("vgg", [{"layers": [32, "M", 64, "M", 128, "M"], "hidden": [256]},
                                        {"layers": [8, "M", 16, "M", 32, "M"], "hidden": [64]}], 400,
                                [("otfusion", {"cost": "activation", "anchor": 1}), ("clafusion", {"target": 1})]),
}


def widths(model: torch.nn.Module) -> set[int]:
    """The output widths of a network's weight tensors (CLAFusion keeps the deeper parent's depth, in the target's
    widths)."""
    return {w.shape[0] for w in model.parameters() if w.dim() > 1}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    results, rows = {}, []
    for pair, (arch, shapes, count, methods) in PAIRS.items():
        parents = [build_model(arch, in_channels=3, num_classes=10, **kwargs).to(device).eval() for kwargs in shapes]
        samples = torch.randn(count, 3, 32, 32, device=device)
        with torch.no_grad():
            pass_s = best_time(lambda: [p(samples) for p in parents], args.repeats)
        for method, options in methods:
            for repair in (False, True):
                def fuse():
                    alignment = fusion.align(method, parents, samples, **options)
                    return fusion.repaired(alignment, samples)[0] if repair else alignment.network()

                assert widths(fuse()) == widths(parents[1]), f"{pair}: {method} not in the smaller parent's widths"
                seconds = best_time(fuse, args.repeats)
                label = method + "".join(f", {k}={v}" for k, v in options.items()) + (", REPAIR" if repair else "")
                results.setdefault(pair, {})[label] = seconds
                rows.append([pair, label, str(count), f"{seconds:.2f}", f"{seconds / pass_s:.0f}",
                             "meets" if seconds < TARGET_S else "misses"])
                print(f"{pair}: {label} {seconds:.2f} s")
    worst = max(s for pair in results.values() for s in pair.values())
    load = os.getloadavg()[0]  # other work on the machine slows every row alike
    summary = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(), "load": load,
               "seconds": results, "worst_s": worst, "target_s": TARGET_S, "meets": worst < TARGET_S}
    table = markdown(["parents", "fusion into the smaller parent's shape", "fusion samples", "seconds",
                      "x the parents' pass over the samples", f"target (under {TARGET_S:g} s)"], rows,
                     f"`python bench/bench_width_fusion.py --repeats {args.repeats}`: best of {args.repeats}; "
                     f"untrained parents, random CIFAR-shaped samples; {device}, {torch.get_num_threads()} threads, "
                     f"load average {load:.1f} at the end, torch {torch.__version__}.")
    return finish(summary, "width_fusion", table, args.out)


if __name__ == "__main__":
    main()
