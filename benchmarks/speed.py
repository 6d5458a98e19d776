"""Speed and memory of LAP's statistics pass, side by side in one run (`make bench`).

Each measurement runs in its own subprocess, so that its peak RSS is its own. Methods:
  dense     the paper's closed form written straightforwardly: X W_k, the residual, X^T R and X U_l
            all materialised, float32, in memory
  core32    lip's core (`lip_repair`: chunked, tail directions only) on the same tensors, float32
  core64    the same in float64 compute (the `lip repair` default)
  floor     a bare X @ U in float32, in chunks of lip's default size: the compute floor
  read      a bare read pass over the memory-mapped .npy file: the I/O floor (page cache warm)
  repair    `lip repair --dry-run` end to end on the .npy file (all passes, accuracies included)

Usage: python benchmarks/speed.py [--shapes cifar,imagenet] [--full] [--out benchmarks/speed.json]
`--full` adds the ImageNet-1k-size float16 cache (1.28M x 2048, 5.2 GB written to --scratch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from results_md import replace_section  # noqa: E402

SHAPES = {
    "cifar": {"n": 50_000, "q": 512, "l": 100, "k": 50, "dtype": "float32"},
    "imagenet": {"n": 200_000, "q": 2048, "l": 1000, "k": 500, "dtype": "float32"},
    "imagenet-full": {"n": 1_281_167, "q": 2048, "l": 1000, "k": 500, "dtype": "float16"},
}
CHUNK = 16384  # lip repair's default --chunk-rows
IN_MEMORY = ("dense", "core32", "core64", "floor")


def make_data(folder: Path, shape: dict) -> None:
    """Features (memory-mapped .npy, written in blocks), integer labels and a checkpoint."""
    import torch

    rng = np.random.default_rng(0)
    n, q, l = shape["n"], shape["q"], shape["l"]
    features = np.lib.format.open_memmap(
        folder / "features.npy", mode="w+", dtype=shape["dtype"], shape=(n, q)
    )
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        features[start:stop] = rng.standard_normal((stop - start, q), dtype=np.float32)
    features.flush()
    del features
    np.save(folder / "labels.npy", rng.integers(0, l, n))
    weight = torch.from_numpy(rng.standard_normal((l, q), dtype=np.float32) * 0.05)
    torch.save({"fc.weight": weight, "fc.bias": torch.zeros(l)}, folder / "model.pt")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def start_memory() -> float:
    """Reset the peak-RSS mark (Linux) and return the current RSS in MB."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def measure(method: str, folder: Path, k: int) -> dict:
    """Run one method in this process; returns seconds and peak memory above the loaded inputs."""
    import torch

    from lip_cli import lip_repair

    if method == "read":
        baseline = start_memory()
        array = np.load(folder / "features.npy", mmap_mode="r")
        started = time.perf_counter()
        total = 0.0
        for start in range(0, array.shape[0], 65536):
            total += float(np.array(array[start : start + 65536])[:, 0].sum())
        return {
            "seconds": time.perf_counter() - started,
            "peak_mb": peak_rss_mb() - baseline,
            "peak_total_mb": peak_rss_mb(),
        }
    if method == "repair":
        from lip_cli.jobs import RepairRequest, repair_checkpoint

        baseline = start_memory()
        started = time.perf_counter()
        request = RepairRequest(
            checkpoint=folder / "model.pt",
            features=folder / "features.npy",
            k=k,
            dry_run=True,
            compute_dtype="float32",
        )
        repair_checkpoint(request)
        return {
            "seconds": time.perf_counter() - started,
            "peak_mb": peak_rss_mb() - baseline,
            "peak_total_mb": peak_rss_mb(),
        }

    x = torch.from_numpy(np.load(folder / "features.npy"))  # (n, q), as stored
    if method != "floor":
        x = x.float()
    labels = torch.from_numpy(np.load(folder / "labels.npy"))
    state = torch.load(folder / "model.pt", weights_only=True)
    weight, bias = state["fc.weight"], state["fc.bias"]
    baseline = start_memory()
    started = time.perf_counter()
    if method == "dense":
        w = weight.T  # (q, l)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        w_k = (u[:, :k] * s[:k]) @ vh[:k]
        y = torch.nn.functional.one_hot(labels, w.shape[1]).float()  # (n, l)
        residual = y - bias - x @ w_k  # (n, l)
        xtr = x.T @ residual  # (q, l)
        x_ul = x @ u[:, k:]  # (n, m)
        numerator = torch.diagonal(u[:, k:].T @ xtr @ vh[k:].T)
        denominator = (x_ul * x_ul).sum(0)
        _ = numerator / denominator
    elif method in ("core32", "core64"):
        dtype = torch.float32 if method == "core32" else torch.float64
        lip_repair(weight, bias, x, labels, k, compute_dtype=dtype, chunk_rows=CHUNK)
    elif method == "floor":
        u = torch.linalg.svd(weight.T.double(), full_matrices=False).U.float()
        for start in range(0, x.shape[0], CHUNK):
            _ = x[start : start + CHUNK].float() @ u
    return {
        "seconds": time.perf_counter() - started,
        "peak_mb": peak_rss_mb() - baseline,
        "peak_total_mb": peak_rss_mb(),
    }


def run_one(method: str, folder: Path, k: int) -> dict:
    output = subprocess.run(
        [sys.executable, __file__, "--one", method, "--folder", str(folder), "--k", str(k)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="cifar,imagenet")
    parser.add_argument("--full", action="store_true", help="also the 1.28M x 2048 float16 cache, end to end")
    parser.add_argument("--scratch", default=None, help="folder for generated data (default: a temp folder)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--render", help="rewrite the RESULTS.md section from a saved --out JSON and stop")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, Path(args.folder), args.k)))
        return
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        write_section(saved["results"], saved["command"], saved["machine"])
        return

    import torch

    machine = f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores"
    print(machine)
    names = args.shapes.split(",") + (["imagenet-full"] if args.full else [])
    results = {}
    for name in names:
        shape = SHAPES[name]
        with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
            folder = Path(scratch)
            started = time.perf_counter()
            make_data(folder, shape)
            print(
                f"\n{name}: n={shape['n']:,} q={shape['q']} l={shape['l']} k={shape['k']} {shape['dtype']} "
                f"(data made in {time.perf_counter() - started:.0f} s)"
            )
            methods = (
                ("floor", "read", "repair") if name == "imagenet-full" else (*IN_MEMORY, "read", "repair")
            )
            rows = {method: run_one(method, folder, shape["k"]) for method in methods}
        results[name] = rows
        for method, row in rows.items():
            print(f"  {method:<7} {row['seconds']:8.2f} s   peak +{row['peak_mb']:8.0f} MB")
        if "dense" in rows:
            print(
                f"  dense / core32 = {rows['dense']['seconds'] / rows['core32']['seconds']:.2f}x, "
                f"dense / core64 = {rows['dense']['seconds'] / rows['core64']['seconds']:.2f}x, "
                f"core32 / floor = {rows['core32']['seconds'] / rows['floor']['seconds']:.2f}x"
            )
        floors = rows["read"]["seconds"] + rows.get("floor", {"seconds": float("nan")})["seconds"]
        print(f"  repair / (read + floor) = {rows['repair']['seconds'] / floors:.2f}x")
    help_seconds = []
    for _ in range(5):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lip_cli", "--help"], capture_output=True, check=True)
        help_seconds.append(time.perf_counter() - started)
    results["lip --help"] = {"seconds": min(help_seconds)}
    print(f"\nlip --help: {min(help_seconds):.3f} s (best of 5)")
    command = "python benchmarks/speed.py " + " ".join(sys.argv[1:])
    if args.out:
        saved = {"command": command.strip(), "machine": machine, "results": results}
        Path(args.out).write_text(json.dumps(saved, indent=2) + "\n")
    write_section(results, command.strip(), machine)


def write_section(results: dict, command: str, machine: str) -> None:
    """The speed section of benchmarks/RESULTS.md: every figure of one run, and its ratios."""
    lines = [
        "## Speed and memory",
        "",
        f"Generated by `{command}` ({machine}); every figure below comes from that one run.",
        "Peak memory: the growth of the process's peak RSS over its size after loading the inputs, and",
        "the whole process's peak RSS (each method runs in its own process; in-memory methods hold the",
        "features in RAM). `read` maps the whole file, so its figure is file pages.",
        "`repair` is `lip repair --dry-run --compute-dtype float32` through the library (every pass,",
        "accuracies included); the default float64 compute costs about 2x the core time (core64).",
        "",
        "| shape | method | seconds | peak MB over inputs | peak RSS MB |",
        "|---|---|---|---|---|",
    ]
    for shape, rows in results.items():
        if shape == "lip --help":
            continue
        for method, row in rows.items():
            total = row.get("peak_total_mb")
            lines.append(
                f"| {shape} | {method} | {row['seconds']:.2f} | {row['peak_mb']:.0f} | "
                f"{'-' if total is None else f'{total:.0f}'} |"
            )
    lines += [
        "",
        "| shape | dense / core32 | core32 / floor | repair / (read + floor) |",
        "|---|---|---|---|",
    ]
    for shape, rows in results.items():
        if shape == "lip --help":
            continue
        seconds = {method: row["seconds"] for method, row in rows.items()}
        dense = f"{seconds['dense'] / seconds['core32']:.2f}x" if "dense" in seconds else "-"
        floor = f"{seconds['core32'] / seconds['floor']:.2f}x" if "core32" in seconds else "-"
        repair = seconds["repair"] / (seconds["read"] + seconds["floor"])
        lines.append(f"| {shape} | {dense} | {floor} | {repair:.2f}x |")
    if "lip --help" in results:
        lines += [
            "",
            f"`lip --help` takes {results['lip --help']['seconds']:.3f} s (best of 5; torch is not "
            "imported).",
        ]
    replace_section("speed", "\n".join(lines))


if __name__ == "__main__":
    main()
