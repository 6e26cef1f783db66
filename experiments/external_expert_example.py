"""Worked example (README, "Experts from files"): a model this repository did not define, saved as
TorchScript, combined with one of this repository's experts through the universal gate.

    MOE_DATA_DIR=DATA python experiments/external_expert_example.py [out=checkpoints/external_example]

1. ``FashionCNN`` below (not in archs/) learns Fashion-MNIST on its original 28x28 images, as a model
   trained elsewhere would, and is saved with ``torch.jit.script(...).save``;
2. a YAML problem puts that file beside this repository's LeNet5 MNIST expert (trained here); ``crop: 2``
   gives the file the 28x28 originals back from the problems' padded 32x32 images;
3. train_pan.py trains the universal gate (regime real) on both, and merge.py scores logit rules and the
   gate on MNIST test + Fashion-MNIST test (20,000 images, 20 classes).
Budgets are cut to fit a few CPU minutes (2 epochs on 20,000 training images per expert; LeNet5 with batch
64 instead of the paper's 512, which needs more epochs). Prints the
accuracies and the problem file, which predict.py can then use.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

import merge  # noqa: E402
import train_pan  # noqa: E402
import train_source_networks  # noqa: E402
from config import MergeConfig, PanConfig, TaskSpec, TrainConfig, default_data_dir, parse_args  # noqa: E402
from data import get_source, load_task  # noqa: E402

SEED = 0
TRAIN_IMAGES = 20000
EPOCHS = 2
EXPERT = {"epochs": 2, "batch_size": 64, "train_limit": TRAIN_IMAGES}  # this repository's LeNet5
GATE = {"epochs": 3, "train_limit": 10000}
STRATEGIES = ("[naive,energy,max_softmax,{name: gate_hard, gate: universal, regime: real},"
              "{name: gate_confident, gate: universal, regime: real}]")


class FashionCNN(nn.Module):
    """Two 3x3 conv blocks (16, 32 channels, max-pooled) -> 64 ReLU units -> 10 logits, on 1x28x28 images."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                   nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.hidden = nn.Sequential(nn.Linear(32 * 7 * 7, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(self.convs(x)))


def train_fashion(data_dir: str) -> FashionCNN:
    """EPOCHS epochs of Adam on the first TRAIN_IMAGES Fashion-MNIST images, at their original 28x28."""
    torch.manual_seed(SEED)
    source = get_source("fashion_mnist")
    train = load_task(TaskSpec("fashion_mnist"), "train", data_dir, TRAIN_IMAGES)
    images = train.images[..., 2:30, 2:30].float() / 255  # undo the loader's Pad(2): the 28x28 originals
    images = (images - source.mean[0]) / source.std[0]
    model = FashionCNN()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(EPOCHS):
        order = torch.randperm(len(images))
        for start in range(0, len(images), 128):
            batch = order[start:start + 128]
            loss = F.cross_entropy(model(images[batch]), train.labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()


def main(out: Path, data_dir: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    model_file = out / "fashion_cnn.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates TorchScript; the file form stays
        torch.jit.script(train_fashion(data_dir)).save(str(model_file))
    source = get_source("fashion_mnist")
    problem_file = out / "problem.yaml"
    # the settings sections go into the problem file too, so predict.py finds the same checkpoints from it
    problem_file.write_text(yaml.safe_dump({"expert": EXPERT, "gate": GATE, "problem": "mnist_external_fashion",
                                            "problems": {
        "mnist_external_fashion": {"experts": [
            {"task": "mnist"},
            {"task": "fashion_mnist", "file": {"path": str(model_file), "channels": 1, "size": 28, "crop": 2,
                                               "mean": list(source.mean), "std": list(source.std),
                                               "classes": list(source.class_names)}}]}}}, sort_keys=False))
    stage = [f"seeds=[{SEED}]", f"data_dir={data_dir}", f"ckpt_dir={out}", f"results_dir={out / 'results'}"]
    train_source_networks.main(parse_args(TrainConfig, ["dataset=mnist", *stage,
                                                        *(f"expert.{k}={v}" for k, v in EXPERT.items())]))
    train_pan.main(parse_args(PanConfig, [str(problem_file), *stage, "gate_types=[universal]", "regimes=[real]"]))
    summary = merge.main(parse_args(MergeConfig, [str(problem_file), *stage, f"strategies={STRATEGIES}"]))
    rows = merge.read_rows(summary["outputs"]["jsonl"])
    print(f"\nproblem file: {problem_file}")
    for row in rows:
        routing = f"  routing {row['routing_acc']:.4f}" if row.get("routing_acc") is not None else ""
        print(f"{row['strategy']:45s} acc {row['acc']:.4f}{routing}")
    return summary


if __name__ == "__main__":
    options = dict(arg.split("=", 1) for arg in sys.argv[1:])
    main(Path(options.get("out", "checkpoints/external_example")), options.get("data_dir", default_data_dir()))
