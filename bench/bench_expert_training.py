"""Time one epoch of expert training: tensor-resident data (ours) against the original pipeline.

    python bench/bench_expert_training.py [--dataset mnist|cifar10] [--repeats 2] [--num-workers 0]

The baseline is the original set-up: a torchvision Dataset with per-image transforms behind a
DataLoader. Ours loads and normalises the whole split once (timed separately) and slices batches
from a seeded permutation with ``train_classifier``. Same model init, hyperparameters and number
of epochs for both; the last printed line is a JSON summary.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from archs import build_model
from common import derive_seed, resolve_device
from config import DATA_DIR_ENV, TaskSpec
from data import InputFormat, get_source, load_source, load_task, prepare_input, to_unit
from training import accuracy, train_classifier

from summary import finish, markdown  # bench/ is on sys.path when a benchmark runs as a script

LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 0.0  # the paper's expert settings (docs/design.md section 3)


class PerImageCIFAR(Dataset):
    """CIFAR-10 from uint8 arrays with the original per-image PIL + ToTensor + Normalize work
    (torchvision.datasets.CIFAR10 rejects the offline copy's md5, so it cannot be used directly)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: T.Compose) -> None:
        self.images, self.labels, self.transform = images.permute(0, 2, 3, 1).numpy(), labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def baseline_dataset(name: str, data_dir: str) -> Dataset:
    src = get_source(name)
    if name == "mnist":
        transform = T.Compose([T.Pad(2), T.ToTensor(), T.Normalize(src.mean, src.std)])
        return torchvision.datasets.MNIST(data_dir, train=True, download=False, transform=transform)
    images, labels = load_source(name, "train", data_dir, download=False)
    return PerImageCIFAR(images, labels, T.Compose([T.ToTensor(), T.Normalize(src.mean, src.std)]))


def baseline_epoch(model: torch.nn.Module, loader: DataLoader, device: torch.device,
                   max_batches: int | None = None) -> None:
    """The original loop: a fresh optimiser per call, as ``train_classifier`` makes one per call."""
    optimiser = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    total = torch.zeros((), device=device)
    model.train()
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        total += loss.detach() * len(y)
    total.item()  # the same single host sync per epoch as train_classifier


def timed(fn, device: torch.device) -> float:
    """Wall time of ``fn()``; CUDA work is queued asynchronously, so synchronise on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get(DATA_DIR_ENV, "./data"))
    p.add_argument("--dataset", choices=["mnist", "cifar10"], default="mnist")
    p.add_argument("--epochs", type=int, default=1, help="timed epochs per repeat")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--num-workers", type=int, default=0, help="baseline DataLoader workers (original: 0)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="the JSON summary (default results/bench/expert_training_DEVICE.json)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    batch_size = get_source(args.dataset).batch_size  # 512 MNIST, 128 CIFAR-10
    fmt = InputFormat.of(args.dataset)
    print(f"torch {torch.__version__} | device {device} | threads {torch.get_num_threads()} | "
          f"cpus {os.cpu_count()} | {args.dataset} lenet5 batch {batch_size} | "
          f"baseline num_workers={args.num_workers} | {args.repeats} x {args.epochs} epoch(s) each",
          flush=True)

    # Ours: load + normalise once; a one-off cost, so it is reported apart from the epoch time.
    task = TaskSpec(args.dataset)
    start = time.perf_counter()
    train = load_task(task, "train", args.data_dir, download=False)
    inputs, labels = prepare_input(to_unit(train.images, device), fmt), train.labels.to(device)
    ours_setup = time.perf_counter() - start
    test = load_task(task, "test", args.data_dir, download=False)
    test_x, test_y = prepare_input(to_unit(test.images, device), fmt), test.labels.to(device)

    start = time.perf_counter()
    loader = DataLoader(baseline_dataset(args.dataset, args.data_dir), batch_size=batch_size, shuffle=True,
                        num_workers=args.num_workers, generator=torch.Generator().manual_seed(args.seed))
    base_setup = time.perf_counter() - start

    # One init shared by both pipelines, so only the data path differs.
    torch.manual_seed(derive_seed(args.seed, "bench", "init"))
    init = build_model("lenet5", in_channels=fmt.channels, num_classes=10).to(device)
    base_model, ours_model = copy.deepcopy(init), copy.deepcopy(init)

    # Warm-up (one batch each, on a throwaway copy): first-call allocations and kernel selection.
    baseline_epoch(copy.deepcopy(init), loader, device, max_batches=1)
    train_classifier(copy.deepcopy(init), inputs[:batch_size], labels[:batch_size], epochs=1, lr=LR,
                     momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, batch_size=batch_size, seed=args.seed)

    base_times, ours_times = [], []
    for r in range(args.repeats):  # alternate, so background load hits both pipelines alike
        base_times.append(timed(lambda: [baseline_epoch(base_model, loader, device)
                                         for _ in range(args.epochs)], device) / args.epochs)
        ours_times.append(timed(lambda: train_classifier(
            ours_model, inputs, labels, epochs=args.epochs, lr=LR, momentum=MOMENTUM,
            weight_decay=WEIGHT_DECAY, batch_size=batch_size,
            seed=derive_seed(args.seed, "bench", "order", r)), device) / args.epochs)
        print(f"repeat {r}: baseline {base_times[-1]:.2f}, ours {ours_times[-1]:.2f} s/epoch", flush=True)

    # Both models are scored on the same prepared test tensors (identical normalisation to the baseline's).
    accs = {"baseline": accuracy(base_model, test_x, test_y), "ours": accuracy(ours_model, test_x, test_y)}
    runs = (("baseline", base_times, base_setup), ("ours", ours_times, ours_setup))
    stats = {name: {"s_per_epoch": t, "min": min(t), "mean": sum(t) / len(t), "setup_s": setup,
                    "test_acc": accs[name]} for name, t, setup in runs}
    print(f"\n{'pipeline':<10}{'min s/ep':>10}{'mean s/ep':>11}{'setup s':>9}{'test acc':>10}")
    for name, st in stats.items():
        print(f"{name:<10}{st['min']:>10.3f}{st['mean']:>11.3f}{st['setup_s']:>9.2f}{st['test_acc']:>10.4f}")
    speedup = stats["baseline"]["min"] / stats["ours"]["min"]
    speedup_mean = stats["baseline"]["mean"] / stats["ours"]["mean"]
    print(f"speedup (baseline / ours per epoch): {speedup:.2f}x  (from min; from mean {speedup_mean:.2f}x; "
          f"test acc after {args.repeats * args.epochs} epoch(s) each; setup: ours = one-off load+normalise, "
          f"baseline = Dataset/DataLoader construction)")
    summary = {"dataset": args.dataset, "arch": "lenet5", "batch_size": batch_size,
               "epochs_per_repeat": args.epochs, "repeats": args.repeats,
               "baseline_num_workers": args.num_workers, **stats, "speedup": speedup,
               "speedup_mean": speedup_mean, "torch": torch.__version__, "device": str(device),
               "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "seed": args.seed}
    rows = [[name, f"{st['min']:.2f}", f"{st['mean']:.2f}", f"{st['setup_s']:.2f}", f"{100 * st['test_acc']:.2f}"]
            for name, st in stats.items()]
    table = markdown(["pipeline", "fastest epoch (s)", "mean epoch (s)", "setup (s)", "test acc (%)"], rows,
                     f"Speed-up (baseline / ours, fastest epochs): {speedup:.2f}x. `python bench/bench_expert_training.py "
                     f"--repeats {args.repeats}`: LeNet5 on {args.dataset}, batch {batch_size}, paper hyperparameters; "
                     f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}.")
    return finish(summary, "expert_training", table, args.out)


if __name__ == "__main__":
    main()
