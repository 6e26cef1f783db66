"""What routing from the unlabeled inputs costs (issue 29's target): each rule fitted on 5,000 unlabeled inputs, against
the experts' own pass over those inputs and against naive, measured in the same run.

    python bench/bench_unlabeled.py [--inputs 5000] [--repeats 3] [--device cpu]

The activations are LeNet5 experts' (untrained: the time does not depend on what they learnt) on random images,
for two experts of ten classes (mnist_cifar10's shape) and five of two classes (five_mnist's). Each rule fits on
``--inputs`` inputs (the selection half of twice as many) and routes all of them; its time is the best of
``--repeats`` runs. Target (2-core CPU): every rule's default setting, and the table's heaviest settings, under 5 s.
The last line is a JSON summary, also written with a Markdown table under results/bench/.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch
from summary import best_time, finish, markdown  # bench/ is on sys.path when a benchmark runs as a script

from archs import build_model
from common import resolve_device
from strategies import MergeInputs, parse_strategies

TARGET_S = 5.0
SHAPES = {"2 experts x 10 classes": (2, 10), "5 experts x 2 classes": (5, 2)}
RULES = ["naive", "self_train", "self_train(gate=logits,start=energy,confident=0.3)", "cluster_assign",
         "cluster_assign(clusters=30)", "entropy_gate", "entropy_gate(gate=feature)", "self_train(inputs=stream:500)",
         "pseudo_mahalanobis", "pseudo_mahalanobis(rounds=2,shrinkage=9.0)"]


@torch.no_grad()
def expert_pass(models: list[torch.nn.Module], images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every expert's (logits, features) on ``images``, in batches of 512 as merge.py runs them."""
    out = []
    for model in models:
        parts = [model(images[i:i + 512], return_features=True) for i in range(0, len(images), 512)]
        out.append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    results, rows = {}, []
    for shape, (experts, classes) in SHAPES.items():
        models = [build_model("lenet5", in_channels=1, num_classes=classes).to(device).eval() for _ in range(experts)]
        images = torch.rand(2 * args.inputs, 1, 32, 32, device=device)
        pass_s = best_time(lambda: expert_pass(models, images[:args.inputs]), args.repeats)
        activations = expert_pass(models, images)
        maps = [torch.arange(k * classes, (k + 1) * classes) for k in range(experts)]
        inputs = MergeInputs([lo for lo, _ in activations], maps, features=[fe for _, fe in activations],
                             select=torch.arange(2 * args.inputs) % 2 == 0, seed=1)
        naive_s = None
        for call in parse_strategies(RULES):
            seconds = best_time(lambda: call(inputs), args.repeats)
            naive_s = seconds if call.name == "naive" else naive_s
            results.setdefault(shape, {})[call.label] = seconds
            rows.append([shape, call.label, f"{seconds:.3f}", f"{seconds / pass_s:.2f}",
                         f"{seconds / naive_s:.0f}" if naive_s else "",
                         "n/a" if call.name == "naive" else "meets" if seconds < TARGET_S else "misses"])
        results[shape]["expert pass"] = pass_s
        print(f"{shape}: the experts' pass over {args.inputs} inputs {pass_s:.3f} s; "
              + ", ".join(f"{label} {s:.3f} s" for label, s in results[shape].items() if label != "expert pass"))
    worst = max(s for shape in results.values() for label, s in shape.items() if label not in ("naive", "expert pass"))
    load = os.getloadavg()[0]  # other work on the machine slows every row alike; the ratios stand better
    summary = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(), "load": load,
               "inputs": args.inputs, "seconds": results, "worst_s": worst, "target_s": TARGET_S,
               "meets": worst < TARGET_S}
    table = markdown(["experts", "rule", "seconds (fit and route)", "x the experts' pass", "x naive",
                      f"target (under {TARGET_S:g} s)"], rows,
                     f"`python bench/bench_unlabeled.py --inputs {args.inputs} --repeats {args.repeats}`: each rule "
                     f"fitted on {args.inputs} unlabeled inputs and routing {2 * args.inputs}, best of {args.repeats}; "
                     f"the experts' pass is untrained LeNet5s over the {args.inputs} inputs; {device}, "
                     f"{torch.get_num_threads()} threads, load average {load:.1f} at the end, torch "
                     f"{torch.__version__}.")
    return finish(summary, "unlabeled", table, args.out)


if __name__ == "__main__":
    main()
