"""Does LIP help, and when? The paper's protocol at a size that runs on 2 CPU cores in minutes.

For each data set, noise type and rate: train a small MLP with cross-entropy on noisy labels, cache
its penultimate features, and measure clean test accuracy of the original head, of PSP alone
(tail truncated), of LIP (PSP + LAP) at several k, and of `lip repair --k auto` with its
confirmation test, k chosen and confirmed on a clean validation split or on a held-out 10% of the
noisy training labels: the mean and the worst change against the original head, and how often auto
changed the head. Mean and spread over seeds go to benchmarks/RESULTS.md with two figures (spectra
against p, phi between clean and noisy heads).
Usage: python benchmarks/noisy_labels.py [--seeds 3] [--epochs 30] [--quick]
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lip_cli import LapStatistics, LipError, head_svd, repair, spectra
from lip_cli.jobs import RepairRequest, repair_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from results_md import replace_section  # noqa: E402

RATES = (0.0, 0.1, 0.2, 0.4)
HERE = Path(__file__).parent


def synthetic_cifar_like(seed: int) -> tuple[np.ndarray, ...]:
    """100 classes in 20 superclasses of 5, 64-d inputs; classes of a superclass lie close."""
    rng = np.random.default_rng(1000 + seed)
    super_centres = rng.standard_normal((20, 64)) * 1.0
    centres = np.repeat(super_centres, 5, axis=0) + rng.standard_normal((100, 64)) * 0.45

    def sample(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(100), per_class)
        return (centres[labels] + rng.standard_normal((labels.size, 64)) * 0.6).astype(np.float32), labels

    x_train, y_train = sample(100)
    x_test, y_test = sample(40)
    x_val, y_val = sample(20)  # drawn last: the training and test rows stay as they were
    return x_train, y_train, x_test, y_test, x_val, y_val


def digits(seed: int) -> tuple[np.ndarray, ...]:
    """scikit-learn's handwritten digits (8x8 images): 2/3 to train, the rest half validation, half test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.target))
    split = len(order) * 2 // 3
    x = (data.data / 16.0).astype(np.float32)
    train, val, test = order[:split], order[split::2], order[split + 1 :: 2]
    y = data.target
    return x[train], y[train], x[test], y[test], x[val], y[val]


def corrupt(
    labels: np.ndarray, rate: float, kind: str, classes: int, seed: int, groups: np.ndarray | None = None
) -> np.ndarray:
    """Symmetric: a uniformly random other class. Asymmetric: the next class of the same group
    (`groups[c]` is the superclass of class c; by default groups of 5 for 100 classes, else one)."""
    rng = np.random.default_rng(seed)
    flip = rng.random(labels.size) < rate
    if kind == "symmetric":
        other = (labels + rng.integers(1, classes, labels.size)) % classes
    else:
        if groups is None:
            groups = np.arange(classes) // 5 if classes == 100 else np.zeros(classes, dtype=int)
        neighbour = np.empty(classes, dtype=np.int64)
        for group in np.unique(groups):
            members = np.flatnonzero(groups == group)
            neighbour[members] = np.roll(members, -1)
        other = neighbour[labels]
    return np.where(flip, other, labels)


CIFAR_FOLDER = "cifar-100-python"


class _ArraysOnly(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: the CIFAR-100 files need nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def find_cifar100(root: Path | None) -> Path | None:
    """The folder holding torchvision's CIFAR-100 files (train, test, meta), if present."""
    for candidate in [root] if root else [Path("data"), Path.home() / ".cache" / "torchvision"]:
        if candidate and (candidate / CIFAR_FOLDER / "train").exists():
            return candidate / CIFAR_FOLDER
    return None


def load_cifar100(folder: Path) -> tuple[np.ndarray, ...]:
    """Images (n, 3, 32, 32) as float32 in [0, 1], fine labels, and the fine -> coarse map."""

    def read(name: str) -> dict:
        with open(folder / name, "rb") as handle:
            return _ArraysOnly(handle, encoding="bytes").load()

    train_part, test_part = read("train"), read("test")

    def images(part: dict) -> np.ndarray:
        return (np.asarray(part[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32) / 255.0).astype(np.float32)

    fine = np.asarray(train_part[b"fine_labels"])
    coarse = np.asarray(train_part[b"coarse_labels"])
    groups = np.zeros(100, dtype=np.int64)
    groups[fine] = coarse
    return images(train_part), fine, images(test_part), np.asarray(test_part[b"fine_labels"]), groups


class Block(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.skip = (
            nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))
            if stride != 1 or inputs != outputs
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.skip(x))


class ResNet34(nn.Module):
    """The paper's CIFAR-100 backbone: ResNet-34 for 32x32 images, classifier layer `fc`."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
        width = 64
        for outputs, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for index in range(blocks):
                layers.append(Block(width, outputs, stride if index == 0 else 1))
                width = outputs
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def train_cnn(x: np.ndarray, y: np.ndarray, classes: int, epochs: int, seed: int, device: str) -> ResNet34:
    """SGD with momentum, cosine schedule, random crops and flips: the usual CIFAR recipe."""
    torch.manual_seed(seed)
    model = ResNet34(classes).to(device)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    steps = epochs * ((len(y) + 127) // 128)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    mean = inputs.mean((0, 2, 3), keepdim=True)
    std = inputs.std((0, 2, 3), keepdim=True)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels))
        for start in range(0, len(labels), 128):
            batch = order[start : start + 128]
            images = (inputs[batch] - mean) / std
            images = nn.functional.pad(images, (4, 4, 4, 4), mode="reflect")
            dx, dy = np.random.randint(0, 9, 2)
            images = images[:, :, dy : dy + 32, dx : dx + 32]
            if np.random.rand() < 0.5:
                images = images.flip(3)
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model(images.to(device)), labels[batch].to(device))
            loss.backward()
            optimiser.step()
            schedule.step()
    model.eval()
    model.normalise = (mean, std)  # type: ignore[attr-defined]
    return model


def cnn_features(model: ResNet34, x: np.ndarray, device: str) -> torch.Tensor:
    mean, std = model.normalise  # type: ignore[attr-defined]
    parts = []
    with torch.inference_mode():
        for start in range(0, len(x), 500):
            images = (torch.from_numpy(x[start : start + 500]) - mean) / std
            parts.append(model.body(images.to(device)).float().cpu())
    return torch.cat(parts)


class Net(nn.Module):
    def __init__(self, inputs: int, classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(inputs, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU())
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def train(x: np.ndarray, y: np.ndarray, classes: int, epochs: int, seed: int) -> Net:
    torch.manual_seed(seed)
    model = Net(x.shape[1], classes)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        order = torch.randperm(len(labels))
        for start in range(0, len(labels), 128):
            batch = order[start : start + 128]
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(inputs[batch]), labels[batch]).backward()
            optimiser.step()
    return model.eval()


def accuracy(features: torch.Tensor, labels: np.ndarray, weight: torch.Tensor, bias: torch.Tensor) -> float:
    predicted = (features @ weight.T + bias).argmax(1).numpy()
    return float((predicted == labels).mean())


def psp_only(weight: torch.Tensor, k: int) -> torch.Tensor:
    svd = head_svd(weight)
    return ((svd.u[:, :k] * svd.s[:k]) @ svd.v[:, :k].T).T.float()


def run_setting(
    data: tuple, classes: int, kind: str, rate: float, seed: int, epochs: int, ks: list[int]
) -> dict:
    x_train, y_train, x_test, y_test, x_val, y_val = data
    noisy = corrupt(y_train, rate, kind, classes, seed)
    model = train(x_train, noisy, classes, epochs, seed)
    with torch.inference_mode():
        f_train, f_test, f_val = (model.body(torch.from_numpy(x)) for x in (x_train, x_test, x_val))
    return evaluate_head(model.fc, f_train, noisy, f_test, y_test, ks, seed, (f_val, y_val))


AUTO_RUNS = {  # name: (--targets, rows that choose and confirm k)
    "auto val": ("paper", "val"),
    "auto holdout": ("paper", "holdout"),
    "auto-ls val": ("logit-scale", "val"),
    "auto-ls holdout": ("logit-scale", "holdout"),
}


def evaluate_head(
    fc: nn.Linear,
    f_train: torch.Tensor,
    noisy: np.ndarray,
    f_test: torch.Tensor,
    y_test: np.ndarray,
    ks: list[int],
    seed: int,
    val: tuple[torch.Tensor, np.ndarray],
) -> dict:
    """Clean test accuracy of the head as trained, PSP alone, LIP at each k, and lip repair --k auto.

    Each auto run records its clean test accuracy, the k applied and whether it changed the head
    (None when its rows are too few to split), and the same for the best k on the selection part
    applied with no test ("untested"), to show what the test prevents.
    """
    weight, bias = fc.weight.detach().cpu(), fc.bias.detach().cpu()
    row = {"original": accuracy(f_test, y_test, weight, bias), "weight": weight}
    stats = LapStatistics(weight, bias)
    stats.update(f_train, torch.from_numpy(noisy))
    for k in ks:
        k = min(k, stats.svd.rank)
        row[f"psp k={k}"] = accuracy(f_test, y_test, psp_only(weight, k), bias)
        row[f"lip k={k}"] = accuracy(f_test, y_test, repair(stats, k).weight, bias)
        row[f"lip-ls k={k}"] = accuracy(f_test, y_test, repair(stats, k, "logit-scale").weight, bias)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        torch.save({"fc.weight": weight, "fc.bias": bias}, folder / "model.pt")
        np.save(folder / "features.npy", f_train.numpy())
        np.save(folder / "labels.npy", noisy)
        np.savez(folder / "val.npz", features=val[0].numpy(), labels=val[1])
        for name, (targets, rows) in AUTO_RUNS.items():
            request = RepairRequest(
                checkpoint=folder / "model.pt",
                features=folder / "features.npy",
                k="auto",
                val_features=folder / "val.npz" if rows == "val" else None,
                force_write=True,
                force=True,
                seed=seed,
                targets=targets,
            )
            try:
                report = repair_checkpoint(request)
            except LipError as error:  # too few rows to split: recorded, not hidden
                print(f"{name}: {error}", flush=True)
                for key in (
                    name,
                    f"{name} k",
                    f"{name} changed",
                    f"{name} untested",
                    f"{name} untested changed",
                ):
                    row[key] = None
                continue
            repaired = torch.load(folder / "model.lip.pt", weights_only=True)["fc.weight"]
            row[name] = accuracy(f_test, y_test, repaired, bias)
            row[f"{name} k"] = report.k
            row[f"{name} changed"] = report.decision.confirmed
            best = report.decision.best_k  # what choosing alone would apply, with no test
            row[f"{name} untested"] = accuracy(f_test, y_test, repair(stats, best, targets).weight, bias)
            row[f"{name} untested changed"] = best != report.rank
    return row


def run_cifar100(folder: Path, kind: str, rate: float, seed: int, epochs: int, device: str) -> dict:
    """The paper's setting: ResNet-34 trained with cross-entropy on noisy CIFAR-100 labels."""
    x_train, y_train, x_test, y_test, groups = load_cifar100(folder)
    noisy = corrupt(y_train, rate, kind, 100, seed, groups)
    model = train_cnn(x_train, noisy, 100, epochs, seed, device)
    f_train, f_test = cnn_features(model, x_train, device), cnn_features(model, x_test, device)
    val = len(y_test) // 2  # the first half of the test set is the clean validation split
    return evaluate_head(
        model.fc,
        f_train,
        noisy,
        f_test[val:],
        y_test[val:],
        [10, 25, 50, 75],
        seed,
        (f_test[:val], y_test[:val]),
    )


def summarise(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    spread = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {spread:.1f}"


def figures(weights_by_rate: dict[float, torch.Tensor], name: str, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    for rate, weight in weights_by_rate.items():
        values = spectra.singular_values(weight).numpy()
        left.semilogy(range(1, len(values) + 1), values / values[0], label=f"p = {rate}")
    left.set_xlabel("component i")
    left.set_ylabel("sigma_i / sigma_1 (log)")
    left.set_title(f"{name}: spectra of the classifier, symmetric noise")
    left.legend()
    clean = spectra.right_singular_vectors(weights_by_rate[0.0])
    noisy = spectra.right_singular_vectors(weights_by_rate[max(weights_by_rate)])
    phi = spectra.subspace_similarity_matrix(clean, noisy).numpy()
    image = right.imshow(
        phi, origin="lower", vmin=0, vmax=1, extent=(0.5, phi.shape[1] + 0.5, 0.5, phi.shape[0] + 0.5)
    )
    right.set_xlabel(f"j (noisy head, p = {max(weights_by_rate)})")
    right.set_ylabel("i (clean head, p = 0)")
    right.set_title("phi(i, j) between clean and noisy heads")
    figure.colorbar(image, ax=right)
    path = out / f"{name}-spectra-phi.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return [path.name]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="one seed, few epochs, nothing written")
    parser.add_argument("--cifar100", type=Path, default=None, help="folder holding cifar-100-python/")
    parser.add_argument("--cifar-epochs", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (1 is faster on a busy machine)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs = 1, 3
    torch.set_num_threads(args.threads)
    out = Path(tempfile.mkdtemp()) if args.quick else HERE
    started = time.perf_counter()
    sets = {
        "synthetic-100": (synthetic_cifar_like, 100, [10, 25, 50]),
        "digits": (digits, 10, [3, 5, 8]),
    }
    lines, images = [], []
    for name, (loader, classes, ks) in sets.items():
        weights: dict[float, torch.Tensor] = {}
        for kind in ("symmetric", "asymmetric"):
            for rate in RATES:
                if kind == "asymmetric" and rate == 0.0:
                    continue
                rows = [
                    run_setting(loader(seed), classes, kind, rate, seed, args.epochs, ks)
                    for seed in range(args.seeds)
                ]
                lines.append(setting_line(name, kind, rate, rows))
                if kind == "symmetric":
                    weights[rate] = rows[0]["weight"]
            if kind == "symmetric":
                images += figures(weights, name, out)
    cifar = find_cifar100(args.cifar100)
    if cifar is None:
        print("CIFAR-100 files (cifar-100-python/) not found; skipping the paper's CIFAR-100 setting")
    elif args.device == "cpu" and args.cifar100 is None:
        print(f"CIFAR-100 found at {cifar}, but no GPU: pass --cifar100 to train ResNet-34 on the CPU anyway")
    else:
        for kind, rate in (("symmetric", 0.2), ("symmetric", 0.4), ("asymmetric", 0.2), ("asymmetric", 0.4)):
            rows = [
                run_cifar100(cifar, kind, rate, seed, args.cifar_epochs, args.device)
                for seed in range(args.seeds)
            ]
            lines.append(setting_line("cifar-100 (ResNet-34)", kind, rate, rows))
    if not args.quick:
        write_results(lines, images, args, time.perf_counter() - started)


def auto_changes(rows: list[dict], run: str) -> tuple[list[float], int]:
    """Change of clean test accuracy against the original head (points) per seed, and how many changed it."""
    done = [row for row in rows if row[run] is not None]
    return [100 * (row[run] - row["original"]) for row in done], sum(
        bool(row[f"{run} changed"]) for row in done
    )


UNTESTED = {f"{run} untested": run for run in AUTO_RUNS}


def auto_cell(changes: list[float], changed: int) -> str:
    if not changes:
        return "not run"
    return f"{statistics.fmean(changes):+.2f} / {min(changes):+.2f} / {changed} of {len(changes)}"


def setting_line(name: str, kind: str, rate: float, rows: list[dict]) -> tuple:
    """One setting's cells: fixed-k methods (mean ± sd) and each auto run (mean / worst / changed)."""
    fixed = [key for key in rows[0] if key != "weight" and not key.startswith("auto")]
    cells = {method: summarise([row[method] for row in rows]) for method in fixed}
    autos = {run: auto_changes(rows, run) for run in [*AUTO_RUNS, *UNTESTED]}
    ks = " / ".join(", ".join(str(row[f"{run} k"]) for row in rows) for run in AUTO_RUNS)
    print(f"{name} {kind} p={rate}: " + "  ".join(f"{m} {c}" for m, c in cells.items()), flush=True)
    print("    " + "  ".join(f"{run} {auto_cell(*value)}" for run, value in autos.items()), flush=True)
    return name, kind, rate, cells, autos, ks


def write_results(lines: list, images: list[str], args: argparse.Namespace, seconds: float) -> None:
    command = "python benchmarks/noisy_labels.py " + " ".join(sys.argv[1:])
    text = [
        "## Accuracy: does LIP help, and when?",
        "",
        f"Generated by `{command.strip()}` ({args.seeds} seeds, {args.epochs} epochs, "
        f"{seconds / 60:.1f} min on {torch.get_num_threads()} CPU threads).",
        "Clean test accuracy in %, mean ± standard deviation over seeds.",
        "`psp` keeps the top k singular triplets and drops the tail;",
        "`lip` is PSP + LAP (the paper's formula);",
        "`lip-ls` is the same with `--targets logit-scale`: the labels centred and scaled to the head's own",
        "logit margin before LAP's fit (lip's variant, not the paper's formula).",
    ]
    datasets = list(dict.fromkeys(line[0] for line in lines))
    for dataset in datasets:
        ours = [line for line in lines if line[0] == dataset]
        cells = ours[0][3]
        text += [
            "",
            f"### {dataset}",
            "",
            "| noise | p | " + " | ".join(cells) + " |",
            "|---|---|" + "---|" * len(cells),
        ]
        text += [
            f"| {kind} | {rate} | " + " | ".join(cells.values()) + " |" for _, kind, rate, cells, _, _ in ours
        ]
    text += [
        "",
        "### `lip repair --k auto` with its confirmation test",
        "",
        "k is chosen on one half of the rows that judge it and applied only when it beats the unrepaired",
        "layer on the other half (exact one-sided McNemar test, alpha 0.05); otherwise the head stays",
        "as it is. `val`: those rows are a clean validation split (synthetic-100: 2,000 rows; digits:",
        "300 rows), `holdout`: a held-out 10% of the *noisy* training rows. `auto` uses the paper's",
        "targets, `auto-ls` `--targets logit-scale`. Each cell: mean change of clean test accuracy",
        "against the original head / worst change over seeds (points) / runs in which auto changed the",
        "head.",
        "",
        "| data set | noise | p | " + " | ".join(AUTO_RUNS) + " | k applied per seed (same order) |",
        "|---|---|---|" + "---|" * len(AUTO_RUNS) + "---|",
    ]
    for columns, title in ((list(AUTO_RUNS), None), (list(UNTESTED), "untested")):
        if title:
            text += [
                "",
                "The same runs with the test switched off: the best k on the selection part applied",
                "whatever the confirmation rows say (what an untested `--k auto` would do, choosing on",
                "half the rows):",
                "",
                "| data set | noise | p | " + " | ".join(columns) + " |",
                "|---|---|---|" + "---|" * len(columns),
            ]
        for name, kind, rate, _, autos, ks in lines:
            cells = " | ".join(auto_cell(*autos[run]) for run in columns)
            text.append(f"| {name} | {kind} | {rate} | {cells} |" + ("" if title else f" {ks} |"))
        for dataset in datasets:
            totals = [
                auto_cell(
                    [change for line in lines if line[0] == dataset for change in line[4][run][0]],
                    sum(line[4][run][1] for line in lines if line[0] == dataset),
                )
                for run in columns
            ]
            text.append(
                f"| **{dataset}, all settings** | | | " + " | ".join(totals) + (" |" if title else " | |")
            )
    text += ["", "Spectra against p and phi(i, j) between the clean and the noisiest head (seed 0):", ""]
    text += [f"![{image}]({image})" for image in images]
    replace_section("accuracy", "\n".join(text))


if __name__ == "__main__":
    main()
