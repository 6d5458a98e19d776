"""Does LIP help, and when? The paper's protocol at a size that runs on 2 CPU cores in minutes.

For each network (an MLP on a synthetic 100-class set, an MLP and a small CNN on sklearn's digits),
training regime (`short`: 8 epochs by default; `memorise`: long training that fits the noisy labels), noise
type and rate, and seed: train with cross-entropy on noisy labels, then measure the head's accuracy
on its noisy training labels, clean test accuracy before and after PSP / LIP at some k, the oracle
gain (best k on the clean test set: reference only), and what each way of choosing and confirming k
on the clean validation rows applies (`selection_protocols.py`), with how often a confirmed change
raised or lowered clean test accuracy. Also the false-change rate of each protocol on random labels.
Writes the accuracy section of benchmarks/RESULTS.md and two figures.
Usage: python benchmarks/noisy_labels.py [--seeds 4] [--workers 2] [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import multiprocessing
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lip_cli import LapStatistics, head_svd, lip, repair, selection, spectra

sys.path.insert(0, str(Path(__file__).parent))
from results_md import replace_section  # noqa: E402
from selection_protocols import COARSE, PROTOCOLS, run_protocol  # noqa: E402

RATES = (0.0, 0.2, 0.4)
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
    """scikit-learn's handwritten digits (8x8 images): half to train, a quarter each validation, test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.target))
    split = len(order) // 2
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


class SmallCNN(nn.Module):
    """Two 3x3 convolutions (the second after 2x2 pooling) and a 64-wide penultimate layer, for 8x8 digits."""

    def __init__(self, inputs: int, classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 16, 64),
            nn.ReLU(),
        )
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


NETS = {"mlp": Net, "cnn": SmallCNN}
LEARNING_RATE = 2e-3  # Adam's, for every network of the table


def train(
    x: np.ndarray, y: np.ndarray, classes: int, epochs: int, seed: int, net: str = "mlp", cosine: bool = False
) -> nn.Module:
    """Adam, no weight decay, batches of 128; `cosine` anneals the rate to 0 so that long runs settle
    where the network fits its (noisy) training labels."""
    torch.manual_seed(seed)
    model = NETS[net](x.shape[1], classes)
    optimiser = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    steps = epochs * ((len(y) + 127) // 128)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps) if cosine else None
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        order = torch.randperm(len(labels))
        for start in range(0, len(labels), 128):
            batch = order[start : start + 128]
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(inputs[batch]), labels[batch]).backward()
            optimiser.step()
            if schedule is not None:
                schedule.step()
    return model.eval()


def accuracy(features: torch.Tensor, labels: np.ndarray, weight: torch.Tensor, bias: torch.Tensor) -> float:
    predicted = (features @ weight.T + bias).argmax(1).numpy()
    return float((predicted == np.asarray(labels)).mean())


def psp_only(weight: torch.Tensor, k: int) -> torch.Tensor:
    svd = head_svd(weight)
    return ((svd.u[:, :k] * svd.s[:k]) @ svd.v[:, :k].T).T.float()


def run_setting(
    data: tuple,
    classes: int,
    kind: str,
    rate: float,
    seed: int,
    epochs: int,
    ks: list[int],
    net: str = "mlp",
    cosine: bool = False,
) -> dict:
    x_train, y_train, x_test, y_test, x_val, y_val = data
    noisy = corrupt(y_train, rate, kind, classes, seed)
    model = train(x_train, noisy, classes, epochs, seed, net, cosine)
    with torch.inference_mode():
        f_train, f_test, f_val = (model.body(torch.from_numpy(x)) for x in (x_train, x_test, x_val))
    return evaluate_head(model.fc, f_train, noisy, f_test, y_test, ks, seed, (f_val, y_val))


TARGET_CHOICES = ("paper", "logit-scale", "auto")  # --targets of the auto runs
ALPHA = 0.05  # lip repair's --alpha, the level of every protocol's test
HOLDOUT = 0.1  # lip repair's --holdout: the share of training rows held out when there is no --val-features


def _applied(
    stats: LapStatistics, decision: dict, f_test: torch.Tensor, y_test: np.ndarray, before: float
) -> dict:
    """A protocol's decision with the clean test accuracy change of what it applies (points)."""
    weight = repair(stats, decision["k"], decision["targets"]).weight
    after = accuracy(f_test, y_test, weight, stats.bias) if decision["confirmed"] else before
    return {**decision, "change": 100 * (after - before)}


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
    """Clean test accuracy of the head as trained, PSP alone and LIP at some k; the oracle (the best k
    on the clean test set, per targets); and what each choose-and-confirm protocol applies on the
    clean validation rows, and the default protocol on held-out noisy training rows."""
    weight, bias = fc.weight.detach().cpu(), fc.bias.detach().cpu()
    original = accuracy(f_test, y_test, weight, bias)
    row = {"original": original, "train_noisy": accuracy(f_train, noisy, weight, bias), "weight": weight}
    stats = LapStatistics(weight, bias)
    stats.update(f_train, torch.from_numpy(noisy))
    for k in ks:
        k = min(k, stats.svd.rank)
        row[f"psp k={k}"] = accuracy(f_test, y_test, psp_only(weight, k), bias)
        row[f"lip k={k}"] = accuracy(f_test, y_test, repair(stats, k, "paper").weight, bias)
        row[f"lip-ls k={k}"] = accuracy(f_test, y_test, repair(stats, k, "logit-scale").weight, bias)
    test_rows = [(stats.project(f_test), torch.from_numpy(np.asarray(y_test)))]
    grid = selection.k_grid(stats.svd.rank)
    for targets in lip.TARGETS:
        curve = selection.curve(stats, test_rows, grid, targets)
        best = selection.best_k(grid, curve)
        row[f"oracle {targets}"] = (100 * (curve[grid.index(best)] - original), best)
    z_val, y_val = stats.project(val[0]), torch.from_numpy(np.asarray(val[1]))
    for name in PROTOCOLS:
        for targets in TARGET_CHOICES:
            decision = run_protocol(name, stats, z_val, y_val, seed, targets, ALPHA)
            row[f"{name}|{targets}"] = _applied(stats, decision, f_test, y_test, original)
    held = torch.rand(len(noisy), generator=torch.Generator().manual_seed(seed)) < HOLDOUT
    fit = LapStatistics(weight, bias)
    fit.update(f_train[~held], torch.from_numpy(noisy[~held]))
    labels = torch.from_numpy(noisy)
    for targets in lip.TARGETS:  # as lip repair --k auto without --val-features chose before issue 19
        decision = run_protocol(
            "split 50/50", fit, fit.project(f_train[held]), labels[held], seed, targets, ALPHA
        )
        row[f"holdout|{targets}"] = _applied(stats, decision, f_test, y_test, original)
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


SETS = {  # name: (loader, classes, ks shown, network, epochs (short, memorise))
    "synthetic-100 MLP": (synthetic_cifar_like, 100, [10, 25, 50], "mlp", (8, 100)),
    "digits MLP": (digits, 10, [3, 5, 8], "mlp", (8, 600)),
    "digits CNN": (digits, 10, [3, 5, 8], "cnn", (8, 400)),
}
REGIMES = {"short": False, "memorise": True}  # name: cosine schedule to convergence
SETTINGS = [("symmetric", rate) for rate in RATES] + [("asymmetric", rate) for rate in RATES if rate]
LOADED: dict = {}


def one_head(job: tuple[str, str, str, float, int]) -> tuple[tuple, dict]:
    """Train one network and evaluate its head (in a pool worker, on one thread)."""
    name, regime, kind, rate, seed = job
    torch.set_num_threads(1)
    loader, classes, ks, net, epochs = SETS[name]
    key = (loader.__name__, seed)
    if key not in LOADED:
        LOADED[key] = loader(seed)
    long = REGIMES[regime]
    return job, run_setting(LOADED[key], classes, kind, rate, seed, epochs[long], ks, net, long)


NULL_ROWS = 60  # training rows, and as many validation rows, of each random-label problem


def null_false_changes(runs: int) -> dict[str, float]:
    """Share of runs each protocol changes the head when labels are independent of the features."""
    changed: dict[str, int] = {}
    for seed in range(runs):
        generator = torch.Generator().manual_seed(seed)
        q, classes, rows = 6, 4, NULL_ROWS
        weight = torch.randn(classes, q, generator=generator, dtype=torch.float64)
        bias = torch.randn(classes, generator=generator, dtype=torch.float64) * 0.1
        x = torch.randn(2 * rows, q, generator=generator, dtype=torch.float64)
        y = torch.randint(classes, (2 * rows,), generator=generator)
        stats = LapStatistics(weight, bias)
        stats.update(x[:rows], y[:rows])
        z = stats.project(x[rows:])
        for name in PROTOCOLS:
            for targets in TARGET_CHOICES:
                key = f"{name}|{targets}"
                changed[key] = (
                    changed.get(key, 0)
                    + run_protocol(name, stats, z, y[rows:], seed, targets, ALPHA)["confirmed"]
                )
    return {key: count / runs for key, count in changed.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="processes, one torch thread each")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of the short regime")
    parser.add_argument("--null-runs", type=int, default=400, help="seeds of the random-label check")
    parser.add_argument("--quick", action="store_true", help="one seed, few epochs, nothing written")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md", help="the results file to update")
    parser.add_argument("--dump", type=Path, default=None, help="also pickle every network's figures here")
    parser.add_argument("--cifar100", type=Path, default=None, help="folder holding cifar-100-python/")
    parser.add_argument("--cifar-epochs", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    for name, spec in SETS.items():
        SETS[name] = (*spec[:4], (2, 4) if args.quick else (args.epochs, spec[4][1]))
    if args.quick:
        args.seeds, args.null_runs = 1, 20
    torch.set_num_threads(1)
    started = time.perf_counter()
    jobs = [
        (name, regime, kind, rate, seed)
        for name in SETS
        for regime in REGIMES
        for kind, rate in SETTINGS
        for seed in range(args.seeds)
    ]
    results: dict[tuple, dict] = {}
    with multiprocessing.get_context("fork").Pool(args.workers) as pool:
        for job, row in pool.imap_unordered(one_head, jobs):
            results[job] = row
            print(
                f"{len(results)}/{len(jobs)} {job} train {row['train_noisy']:.3f} test {row['original']:.3f}",
                flush=True,
            )
    out = Path(tempfile.mkdtemp()) if args.quick else args.out.parent
    images = []
    for name in SETS:
        if name.endswith("MLP"):
            weights = {rate: results[(name, "short", "symmetric", rate, 0)]["weight"] for rate in RATES}
            images += figures(weights, name.split()[0], out)
    if args.dump:
        with open(args.dump, "wb") as handle:
            pickle.dump(
                {job: {k: v for k, v in row.items() if k != "weight"} for job, row in results.items()}, handle
            )
    null = null_false_changes(args.null_runs)
    cifar_lines = run_cifar(args)
    text = results_text(results, null, args, time.perf_counter() - started, images, cifar_lines)
    print(text)
    if not args.quick:
        replace_section("accuracy", text, args.out)


def run_cifar(args: argparse.Namespace) -> list[str]:
    """The paper's CIFAR-100 setting, where its files and a GPU (or --cifar100 on the CPU) are there."""
    cifar = find_cifar100(args.cifar100)
    if cifar is None:
        print("CIFAR-100 files (cifar-100-python/) not found; skipping the paper's CIFAR-100 setting")
        return []
    if args.device == "cpu" and args.cifar100 is None:
        print(f"CIFAR-100 found at {cifar}, but no GPU: pass --cifar100 to train ResNet-34 on the CPU anyway")
        return []
    lines = []
    for kind, rate in (("symmetric", 0.2), ("symmetric", 0.4), ("asymmetric", 0.2), ("asymmetric", 0.4)):
        rows = [
            run_cifar100(cifar, kind, rate, seed, args.cifar_epochs, args.device)
            for seed in range(args.seeds)
        ]
        lines.append(setting_line("cifar-100 (ResNet-34)", "memorise", kind, rate, rows))
    return lines


DEFAULT = "split 50/50"  # the protocol lip repair --k auto runs (no alternative was distinguishable from it)


def _tally(decisions: list[dict]) -> tuple[int, int, int]:
    """Confirmed changes that raised clean test accuracy, that lowered it, and all runs."""
    real = sum(d["confirmed"] and d["change"] > 0 for d in decisions)
    lost = sum(d["confirmed"] and d["change"] < 0 for d in decisions)
    return real, lost, len(decisions)


def _decided(decision: dict) -> str:
    if not decision["confirmed"]:
        return f"- (k {decision['best_k']}, p {decision['p']:.2g})"
    short = "ls" if decision["targets"] == "logit-scale" else "paper"
    return f"**{decision['k']}** {short} p {decision['p']:.2g} ({decision['change']:+.1f})"


def setting_line(name: str, regime: str, kind: str, rate: float, rows: list[dict]) -> str:
    """One setting's row of the main table."""
    oracle = [max(row["oracle paper"][0], row["oracle logit-scale"][0]) for row in rows]
    cells = [
        name,
        regime,
        kind,
        f"{rate}",
        f"{100 * statistics.fmean(row['train_noisy'] for row in rows):.1f}",
        summarise([row["original"] for row in rows]),
        f"{statistics.fmean(row['oracle paper'][0] for row in rows):+.1f}",
        f"{statistics.fmean(row['oracle logit-scale'][0] for row in rows):+.1f}",
        f"{statistics.fmean(oracle):+.1f} ({min(oracle):+.1f} to {max(oracle):+.1f})",
    ]
    for targets in TARGET_CHOICES:
        real, lost, runs = _tally([row[f"{DEFAULT}|{targets}"] for row in rows])
        cells.append(f"{real} / {lost}")
    cells.append("; ".join(_decided(row[f"{DEFAULT}|logit-scale"]) for row in rows))
    holdout = [row[f"holdout|{t}"] for row in rows for t in lip.TARGETS]
    real, lost, runs = _tally(holdout)
    cells.append(f"{real} / {lost} of {runs}")
    return "| " + " | ".join(cells) + " |"


def setup_text(short_epochs: int, seeds: int) -> list[str]:
    """The set-up paragraphs of the accuracy section, every size and epoch count from the code."""
    synthetic, digit_sets = synthetic_cifar_like(0), digits(0)
    rows = [f"{len(part):,}" for part in synthetic[1::2]]  # training, test, validation labels
    digit_rows = [f"{len(part):,}" for part in digit_sets[1::2]]
    epochs = {name: spec[4][1] for name, spec in SETS.items()}
    body = Net(synthetic[0].shape[1], 2).body
    widths = f"{body[0].in_features} -> {body[0].out_features} -> {body[2].out_features}"
    return [
        f"Networks: an MLP ({widths} -> classes) on `synthetic-100` (100 Gaussian classes in 20",
        f"superclasses of 5, {synthetic[0].shape[1]}-d inputs; {rows[0]} training, {rows[2]} clean "
        "validation, "
        f"{rows[1]} clean test rows)",
        f"and on sklearn's `digits` (8x8 images; the {sum(len(part) for part in digit_sets[1::2]):,} rows "
        "split "
        f"per seed into {digit_rows[0]} training, {digit_rows[2]}",
        f"clean validation and {digit_rows[1]} clean test rows: a realistic validation set for data this "
        "small), and",
        "a small CNN (two 3x3 convolutions, 64-d penultimate layer) on the same digits splits. All",
        f"trained with cross-entropy and Adam (lr {f'{LEARNING_RATE:.0e}'.replace('e-0', 'e-')}, no "
        "weight decay) on the noisy labels. `short`: "
        f"{short_epochs}",
        f"epochs at a constant rate (under-fits its noisy labels). `memorise`: {epochs['synthetic-100 MLP']} "
        f"(synthetic), {epochs['digits MLP']}",
        f"(digits MLP) or {epochs['digits CNN']} (digits CNN) epochs with a cosine schedule to 0: the "
        "network "
        "fits its noisy",
        "training labels (see `train`), the",
        "usual outcome of long training. Noise: symmetric (a uniformly random other class) or asymmetric",
        "(the next class of the same superclass; for digits the next digit), at rate p.",
        "",
        "Columns: `train` accuracy of the trained head on its *noisy* training labels (%); `test` clean",
        "test accuracy before any repair (%, mean ± sd over seeds); `oracle paper` / `oracle ls`: mean",
        "gain in clean test points of the best k judged on the clean test set itself with the paper's",
        "targets / `--targets logit-scale` (a reference that no real run can reach, never used to",
        "choose); `oracle best`: the better of the two, mean (worst to best seed). Then `lip repair --k",
        "auto` as it decides (k chosen on half the clean validation rows, confirmed on the other half)",
        "with `--targets paper`, `logit-scale` (the default) and `auto` (both tried when choosing), each",
        f"`real / lost`: seeds (of {seeds}) where auto confirmed a change and that change raised /",
        "lowered clean test accuracy; `auto decided` lists, per seed, the default's k, targets and p when",
        "confirmed (with its clean test change in points), else `-` with the best k when choosing and its",
        f"p. `holdout`: the same rule on {100 * HOLDOUT:.0f}% held-out *noisy training* rows instead "
        f"(both targets,",
        f"so {len(lip.TARGETS)} runs a seed): what `--k auto` without `--val-features` would have applied.",
        "",
    ]


def results_text(
    results: dict, null: dict, args: argparse.Namespace, seconds: float, images: list[str], cifar: list[str]
) -> str:
    command = "python benchmarks/noisy_labels.py " + " ".join(sys.argv[1:])
    heads = len(results)
    text = [
        "## Accuracy: does LIP help, and when?",
        "",
        f"Generated by `{command.strip()}` ({args.seeds} seeds, {heads} networks, "
        f"{seconds / 60:.1f} min with {args.workers} worker processes of one thread each).",
        "",
        *setup_text(args.epochs, args.seeds),
        "| net | regime | noise | p | train | test | oracle paper | oracle ls | oracle best | auto paper"
        " | auto ls | auto auto | auto decided (`--targets logit-scale`) | holdout real / lost |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in SETS:
        for regime in REGIMES:
            for kind, rate in SETTINGS:
                rows = [results[(name, regime, kind, rate, seed)] for seed in range(args.seeds)]
                text.append(setting_line(name, regime, kind, rate, rows))
    text += cifar
    text += protocol_text(results, null, args)
    text += [
        "",
        "Spectra against p and phi(i, j) between the clean and the noisiest head (`short`, seed 0):",
        "",
    ]
    text += [f"![{image}]({image})" for image in images]
    return "\n".join(text)


def protocol_text(results: dict, null: dict, args: argparse.Namespace) -> list[str]:
    """Every protocol and targets over all networks: confirmed real gains, false changes, null rate."""
    rows = list(results.values())
    helps = [row for row in rows if max(row["oracle paper"][0], row["oracle logit-scale"][0]) >= 1.0]
    text = [
        "",
        "### Choosing and confirming k: alternatives measured on the same rows",
        "",
        f"All {len(rows)} networks above; each protocol sees only the clean validation rows. `split a/b`:",
        "k chosen on a% of the rows (every k of the grid, then every k around the best), confirmed on",
        f"the other b% by the exact one-sided McNemar test at alpha {ALPHA:g} (`split 50/50` is lip's rule).",
        f"`coarse 50/50`: the same with only {COARSE} candidate k. `cross-fit`: k chosen on each half and",
        "tested on the other, each test at alpha / 2 (Bonferroni), the smaller p applied. `real`: confirmed",
        "changes that raised clean test accuracy; `lost`: that lowered it; `sum of gains`: the clean test",
        f"points added over all networks (lost ones subtracted); `found`: real gains among the {len(helps)}",
        "networks whose oracle gain is at least 1 point. `null`: share of",
        f"{args.null_runs} random-label problems (labels independent of the features, {NULL_ROWS} "
        "training and "
        f"{NULL_ROWS}",
        f"validation rows) in which the protocol changed the head; alpha is {ALPHA:g}.",
        "",
        "| protocol | targets | real | lost | sum of gains | found | null |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in PROTOCOLS:
        for targets in TARGET_CHOICES:
            key = f"{name}|{targets}"
            decisions = [row[key] for row in rows]
            real, lost, _ = _tally(decisions)
            found, _, _ = _tally([row[key] for row in helps])
            points = sum(d["change"] for d in decisions)
            cells = [
                name,
                targets,
                real,
                lost,
                f"{points:+.1f}",
                f"{found} of {len(helps)}",
                f"{null[key]:.3f}",
            ]
            text.append("| " + " | ".join(map(str, cells)) + " |")
    held = [row[f"holdout|{t}"] for row in rows for t in lip.TARGETS]
    real, lost, runs = _tally(held)
    text += [
        "",
        f"On held-out noisy training rows instead ({100 * HOLDOUT:.0f}%, split 50/50, both targets: "
        f"{runs} runs), the",
        f"test confirmed {real} changes that raised clean test accuracy and {lost} that lowered it.",
    ]
    return text


if __name__ == "__main__":
    main()
