"""GTSRB trained the way a PyTorch tutorial would: the baseline of the time-to-accuracy comparison (issue #20).

resnetlab's ``gtsrb-fast`` recipe is compared against this loop at equal training time on the same machine. Only the
training method differs: the model is the same CIFAR ResNet-20 (built with ``resnetlab.models.create_model``), and
nothing else of resnetlab is used. The loop is deliberately plain, as a good tutorial writes it:

* the whole image (no ROI crop) resized to 32x32, scaled to [0, 1] and normalised with mean = std = 0.5;
  no augmentation (a tutorial might add RandomRotation(10); this one adds none);
* a seeded 80/20 ``random_split`` into train and validation. That split is leaky: GTSRB holds ~30 frames of every
  physical sign (a "track"), so frames of one sign land on both sides and validation accuracy flatters the model.
  That is the point of the comparison, so the loop also holds out whole tracks (``--holdout-tracks``, default 15%)
  before the split, never trains on them, and reports both accuracies after every epoch;
* float32, NCHW, eager; SGD lr 0.01 momentum 0.9, batch 64, cross-entropy, no schedule; all CPU threads.

Images are decoded once into memory as uint8 32x32 tensors. Tutorials often decode with ToTensor inside the loop,
but decoding speed is not what we want to compare; the per-sample float conversion and normalisation still run in
the DataLoader, as a tutorial's would. Training time counts only the training steps (data loading included,
evaluation excluded); the run stops mid-epoch when ``--minutes`` are spent and then evaluates, so the last row is at
exactly the budget.

Run from the repository root::

    python benchmarks/plain_gtsrb_loop.py --data ../shared/data/gtsrb-dev --out runs/plain-gtsrb --minutes 15

``OUT/metrics.csv`` has one row per epoch (``train_seconds`` is cumulative); ``OUT/run_info.json`` records the
command, versions, CPU, threads, dates and split sizes. ``benchmarks/time_to_accuracy.py`` plots it beside
resnetlab runs.
"""

import argparse
import csv
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, random_split
from torchvision.transforms import v2

from resnetlab.models import create_model

NUM_CLASSES = 43
CSV_COLUMNS = ("Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId", "Path", "Track")
METRIC_COLUMNS = ("epoch", "train_seconds", "train_loss", "train_top1", "val_top1", "holdout_top1",
                  "images_per_second")


# ----------------------------------------------------------------------------------------------------------- data
class GTSRB(Dataset):
    """Kaggle-layout GTSRB rows, decoded once into a uint8 tensor (N, 3, 32, 32); transforms applied per sample."""

    decode = v2.Compose([v2.Resize((32, 32)), v2.ToImage()])
    transform = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize((0.5,) * 3, (0.5,) * 3)])

    def __init__(self, folder, rows):
        self.images = torch.stack([self.load(folder / row["Path"]) for row in rows])
        self.labels = torch.tensor([int(row["ClassId"]) for row in rows])

    def load(self, path):
        with Image.open(path) as image:
            return self.decode(image.convert("RGB"))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.transform(self.images[index]), self.labels[index]


def read_rows(folder):
    csv_path = folder / "Train.csv"
    if not folder.is_dir() or not csv_path.is_file():
        sys.exit(f"error: {csv_path} not found (expected a Kaggle-layout GTSRB folder with Train.csv)")
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in CSV_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            sys.exit(f"error: {csv_path} lacks the column(s) {', '.join(missing)}")
        rows = list(reader)
    for row in rows:  # paths are relative to the CSV's folder and may step out of it (../gtsrb-dev/...)
        row["Path"] = os.path.normpath(row["Path"])
        if not (folder / row["Path"]).is_file():
            sys.exit(f"error: image {folder / row['Path']} listed in {csv_path} not found")
    return rows


def split_holdout(rows, fraction, seed):
    """Hold out whole tracks (ClassId + Track): a shuffled, seeded choice of about ``fraction`` of them."""
    tracks = sorted({(row["ClassId"], row["Track"]) for row in rows})
    order = torch.randperm(len(tracks), generator=torch.Generator().manual_seed(seed)).tolist()
    held = {tracks[i] for i in order[:round(fraction * len(tracks))]}
    keep = [row for row in rows if (row["ClassId"], row["Track"]) not in held]
    return keep, [row for row in rows if (row["ClassId"], row["Track"]) in held], len(held)


# ------------------------------------------------------------------------------------------------- train and eval
def evaluate(model, loader):
    if loader is None:
        return float("nan")
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader:
            correct += (model(images).argmax(1) == labels).sum().item()
            total += len(labels)
    return correct / total


def write_atomic(path, text):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="Kaggle-layout GTSRB folder holding Train.csv")
    parser.add_argument("--out", type=Path, required=True, help="folder for metrics.csv and run_info.json")
    parser.add_argument("--minutes", type=float, default=15.0, help="training-time budget (evaluation excluded)")
    parser.add_argument("--model", choices=("resnet20", "resnet18"), default="resnet20")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--holdout-tracks", type=float, default=0.15, help="fraction of whole tracks held out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0.0 <= args.holdout_tracks < 1.0:
        parser.error("--holdout-tracks must be in [0, 1)")

    started = datetime.now(timezone.utc)
    torch.manual_seed(args.seed)
    torch.set_num_threads(os.cpu_count())
    rows, holdout_rows, holdout_tracks = split_holdout(read_rows(args.data), args.holdout_tracks, args.seed)
    print(f"decoding {len(rows) + len(holdout_rows)} images from {args.data} ...", flush=True)
    train_set, val_set = random_split(GTSRB(args.data, rows), [0.8, 0.2],
                                      generator=torch.Generator().manual_seed(args.seed))
    holdout_set = GTSRB(args.data, holdout_rows) if holdout_rows else None
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=256)
    holdout_loader = DataLoader(holdout_set, batch_size=256) if holdout_set else None

    if args.model == "resnet20":
        model = create_model("resnet20", NUM_CLASSES)
    else:
        model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    args.out.mkdir(parents=True, exist_ok=True)
    info = {
        "command": " ".join([sys.executable, *sys.argv]), "args": {k: str(v) for k, v in vars(args).items()},
        "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
        "cpu": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                    platform.processor()),
        "threads": torch.get_num_threads(), "started_utc": started.isoformat(timespec="seconds"),
        "split": {"train": len(train_set), "val": len(val_set), "holdout": len(holdout_rows),
                  "holdout_tracks": holdout_tracks, "val_is": "random_split of the non-held-out images (leaky)"},
    }
    budget, train_seconds, epoch, history = args.minutes * 60.0, 0.0, 0, []
    while train_seconds < budget:
        epoch += 1
        model.train()
        loss_sum = correct = seen = 0
        epoch_seconds, tick = 0.0, time.perf_counter()
        for images, labels in train_loader:
            optimizer.zero_grad()
            logits = model(images)
            loss = loss_fn(logits, labels)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
            epoch_seconds = time.perf_counter() - tick
            if train_seconds + epoch_seconds >= budget:
                break  # out of time mid-epoch: stop here and evaluate, so the last row is at the budget
        train_seconds += epoch_seconds
        history.append({"epoch": epoch, "train_seconds": f"{train_seconds:.2f}", "train_loss": f"{loss_sum / seen:.4f}",
                        "train_top1": f"{correct / seen:.4f}", "val_top1": f"{evaluate(model, val_loader):.4f}",
                        "holdout_top1": f"{evaluate(model, holdout_loader):.4f}",
                        "images_per_second": f"{seen / epoch_seconds:.1f}"})
        print(", ".join(f"{k} {v}" for k, v in history[-1].items()), flush=True)
        lines = [",".join(METRIC_COLUMNS)] + [",".join(str(row[c]) for c in METRIC_COLUMNS) for row in history]
        write_atomic(args.out / "metrics.csv", "\n".join(lines) + "\n")

    info["finished_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    info["train_seconds"], info["epochs"] = round(train_seconds, 2), epoch
    write_atomic(args.out / "run_info.json", json.dumps(info, indent=2) + "\n")
    last = history[-1]
    print(f"plain loop, {args.model}: {epoch} epochs in {train_seconds / 60:.1f} min of training; "
          f"val top-1 {last['val_top1']} (random split, leaky), held-out tracks top-1 {last['holdout_top1']}")


if __name__ == "__main__":
    main()
