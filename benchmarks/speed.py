"""Speed and memory of `lip repair`, side by side with its floor in one run (`make bench`).

Each measurement runs in its own subprocess, so that its peak RSS is its own. Methods:
  dense     the paper's closed form written straightforwardly: X W_k, the residual, X^T R and X U_l
            all materialised, float32, in memory
  core32    lip's core (`lip_repair`: chunked, tail directions only) on the same tensors, float32
  core64    the same in float64 compute
  xu        a bare X @ U in float32 on the in-memory features, in chunks of lip's default size
  read      a bare read pass over the memory-mapped .npy file (page cache warm)
  floor     a process that starts python and torch, loads the checkpoint, takes the SVD of the head
            (lip's own `head_svd`), then streams the .npy file once computing X @ U in float32, in
            chunks of lip's default size, with torch's default threads: what any one-pass tool pays
  k         `lip repair CKPT -f FEATS --k K --dry-run --json`, end to end (process start included),
            default options (every pass and accuracy included)
  auto      the same with `--k auto`
  precision float32 compute (the default) against float64 on the same data: the relative error of
            the repaired weight and of the re-fitted tail, and of the accuracy curve (not timed)
The end-to-end methods (floor, k, auto) run `--repeat` times, interleaved; the best time counts.

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
IN_MEMORY = ("dense", "core32", "core64", "xu")
END_TO_END = ("floor", "k", "auto")
TARGETS = {"k": 1.3, "auto": 1.5}  # at the large shapes; 2x for both at CIFAR-100 shape


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
    if method == "precision":
        return precision(folder, k)
    x = torch.from_numpy(np.load(folder / "features.npy"))  # (n, q), as stored
    if method != "xu":
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
    elif method == "xu":
        u = torch.linalg.svd(weight.T.double(), full_matrices=False).U.float()
        for start in range(0, x.shape[0], CHUNK):
            _ = x[start : start + CHUNK].float() @ u
    return {
        "seconds": time.perf_counter() - started,
        "peak_mb": peak_rss_mb() - baseline,
        "peak_total_mb": peak_rss_mb(),
    }


def precision(folder: Path, k: int) -> dict:
    """float32 compute (float64 sums) against float64 compute, through the library, at k."""
    import torch

    from lip_cli.lip import KCurve, LapStatistics, k_grid, repair

    array = np.load(folder / "features.npy", mmap_mode="r")
    labels = torch.from_numpy(np.load(folder / "labels.npy"))
    state = torch.load(folder / "model.pt", weights_only=True)
    found = {}
    for dtype in (torch.float32, torch.float64):
        stats = LapStatistics(state["fc.weight"], state["fc.bias"], compute_dtype=dtype)
        kept = []  # the first 2048 rows of the first 8 chunks, for the accuracy curve
        for start in range(0, array.shape[0], CHUNK):
            z = stats.project(torch.from_numpy(np.array(array[start : start + CHUNK])))
            stats.accumulate(z, labels[start : start + CHUNK])
            if len(kept) < 8:
                kept.append((z[:2048], labels[start : start + 2048]))
        curve = KCurve(stats, k_grid(stats.svd.rank))
        for z, y in kept:
            curve.update_projections(z, y)
        found[dtype] = (repair(stats, k), curve)
    (low, low_curve), (high, high_curve) = found[torch.float32], found[torch.float64]
    tail_low, tail_high = low.singular_values_after[k:], high.singular_values_after[k:]
    weight_low, weight_high = low.weight.double(), high.weight.double()
    return {
        "weight_relative_error": float((weight_low - weight_high).norm() / weight_high.norm()),
        "tail_relative_error": float((tail_low - tail_high).norm() / tail_high.norm()),
        "curve_rows": low_curve.samples,
        "curve_points": len(low_curve.correct),
        "curve_count_differences": sum(
            abs(a - b) for a, b in zip(low_curve.correct, high_curve.correct, strict=True)
        ),
    }


def floor_pass(folder: Path) -> None:
    """The floor process: start-up, checkpoint, SVD of the head, one streaming pass of X @ U."""
    import torch

    from lip_cli.lip import head_svd

    weight = torch.load(folder / "model.pt", weights_only=True)["fc.weight"]
    u = head_svd(weight).u.float()  # (q, r): the SVD as lip takes it
    array = np.load(folder / "features.npy", mmap_mode="r")
    for start in range(0, array.shape[0], CHUNK):
        _ = torch.from_numpy(np.asarray(array[start : start + CHUNK])).float() @ u


def end_to_end(method: str, folder: Path, k: int) -> dict:
    """Run one end-to-end process as this process's only child: its wall time and peak RSS."""
    if method == "floor":
        command = [sys.executable, __file__, "--floor-pass", str(folder)]
    else:
        command = [sys.executable, "-m", "lip_cli", "repair", str(folder / "model.pt")]
        command += ["-f", str(folder / "features.npy"), "--k", "auto" if method == "auto" else str(k)]
        command += ["--dry-run", "--json"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode not in (0, 3):  # 3: --k auto without validation rows confirms nothing
        raise subprocess.CalledProcessError(result.returncode, command, result.stdout, result.stderr)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    row = {"seconds": seconds, "peak_total_mb": peak}
    if method != "floor":
        document = json.loads(result.stdout)
        row |= {"k": document["k_chosen"], "accuracy_rows": document.get("accuracy_rows")}
    return row


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
    parser.add_argument(
        "--section",
        default="speed",
        help="the RESULTS.md section to write (another name keeps a separate run apart)",
    )
    parser.add_argument("--repeat", type=int, default=2, help="runs of each end-to-end method (best counts)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--floor-pass", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_pass:
        floor_pass(Path(args.floor_pass))
        return
    if args.one:
        method, folder = args.one, Path(args.folder)
        row = end_to_end(method, folder, args.k) if method in END_TO_END else measure(method, folder, args.k)
        print(json.dumps(row))
        return
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        write_section(saved["results"], saved["command"], saved["machine"], args.section)
        return

    import torch

    load = os.getloadavg()[0]
    machine = (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
        f"load average {load:.1f} at the start"
    )
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
            methods = ("read",) if name == "imagenet-full" else (*IN_MEMORY, "read", "precision")
            rows = {method: run_one(method, folder, shape["k"]) for method in methods}
            runs: dict[str, list[dict]] = {method: [] for method in END_TO_END}
            for _ in range(args.repeat):  # interleaved, so that a burst of load hits all of them
                for method in END_TO_END:
                    runs[method].append(run_one(method, folder, shape["k"]))
            for method, done in runs.items():
                rows[method] = min(done, key=lambda row: row["seconds"]) | {
                    "all_seconds": [row["seconds"] for row in done]
                }
        results[name] = rows
        for method, row in rows.items():
            if method == "precision":
                print(f"  float32 against float64: {json.dumps(row)}")
                continue
            peak = (
                f"peak +{row['peak_mb']:6.0f} MB"
                if "peak_mb" in row
                else f"peak {row['peak_total_mb']:6.0f} MB"
            )
            print(f"  {method:<7} {row['seconds']:8.2f} s   {peak}")
        if "dense" in rows:
            print(
                f"  dense / core32 = {rows['dense']['seconds'] / rows['core32']['seconds']:.2f}x, "
                f"core32 / xu = {rows['core32']['seconds'] / rows['xu']['seconds']:.2f}x"
            )
        floor = rows["floor"]["seconds"]
        k_ratio, auto_ratio = rows["k"]["seconds"] / floor, rows["auto"]["seconds"] / floor
        print(f"  k / floor = {k_ratio:.2f}x, auto / floor = {auto_ratio:.2f}x")
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
    write_section(results, command.strip(), machine, args.section)


def write_section(results: dict, command: str, machine: str, section: str = "speed") -> None:
    """A speed section of benchmarks/RESULTS.md: every figure of one run, and its ratios."""
    lines = [
        "## Speed and memory" + (": the ImageNet-1k-size cache" if section != "speed" else ""),
        "",
        f"Generated by `{command}` ({machine}); every figure below comes from that one run.",
        "`floor`, `k` and `auto` are whole processes (start-up included) with torch's default threads:",
        "`floor` starts python and torch, loads the checkpoint, takes the head's SVD and streams the",
        "features once computing X @ U in float32; `k` and `auto` are `lip repair --dry-run` with an",
        "explicit k and with `--k auto`, default options, every pass and accuracy included. Each ran",
        "`--repeat` times interleaved with the others; the best time counts and all are listed.",
        "The in-memory methods (`dense`, `core32`, `core64`, `xu`) time the core on features held in",
        "RAM; their memory column is the growth of the peak RSS over the loaded inputs. `read` maps the",
        "whole file, so its figure is file pages.",
        "",
        "| shape | method | seconds | peak MB over inputs | peak RSS MB | runs (s) |",
        "|---|---|---|---|---|---|",
    ]
    for shape, rows in results.items():
        if shape == "lip --help":
            continue
        for method, row in rows.items():
            if method == "precision":
                continue
            over = row.get("peak_mb")
            runs = ", ".join(f"{value:.2f}" for value in row.get("all_seconds", []))
            lines.append(
                f"| {shape} | {method} | {row['seconds']:.2f} | {'-' if over is None else f'{over:.0f}'} | "
                f"{row['peak_total_mb']:.0f} | {runs or '-'} |"
            )
    lines += [
        "",
        "| shape | dense / core32 | core32 / xu | k / floor (target) | auto / floor (target) | k chosen |",
        "|---|---|---|---|---|---|",
    ]
    for shape, rows in results.items():
        if shape == "lip --help":
            continue
        seconds = {method: row["seconds"] for method, row in rows.items() if method != "precision"}
        dense = f"{seconds['dense'] / seconds['core32']:.2f}x" if "dense" in seconds else "-"
        core = f"{seconds['core32'] / seconds['xu']:.2f}x" if "core32" in seconds else "-"
        scale = 2.0 if shape == "cifar" else 1.0
        ratios = [
            f"{seconds[method] / seconds['floor']:.2f}x (<= {TARGETS[method] if scale == 1 else scale}x)"
            for method in ("k", "auto")
        ]
        lines.append(f"| {shape} | {dense} | {core} | {ratios[0]} | {ratios[1]} | {rows['auto']['k']} |")
    measured = any(isinstance(rows, dict) and "precision" in rows for rows in results.values())
    lines += (
        []
        if not measured
        else [
            "",
            "Precision of the default float32 compute (float32 products, float64 sums) against",
            "`--compute-dtype float64` on the same data, through the library at the explicit k: relative",
            "(Frobenius) error of the repaired weight and of the re-fitted tail singular values, and the",
            "accuracy curve (every k of the grid) on the first 2048 rows of up to 8 chunks, as total",
            "differences in correct counts over all k.",
            "",
            "| shape | weight | tail values | curve rows x k | count differences |",
            "|---|---|---|---|---|",
        ]
    )
    for shape, rows in results.items():
        found = rows.get("precision") if isinstance(rows, dict) else None
        if found:
            lines.append(
                f"| {shape} | {found['weight_relative_error']:.1e} | {found['tail_relative_error']:.1e} | "
                f"{found['curve_rows']} x {found['curve_points']} | {found['curve_count_differences']} |"
            )
    if "lip --help" in results:
        lines += [
            "",
            f"`lip --help` takes {results['lip --help']['seconds']:.3f} s (best of 5; torch is not "
            "imported).",
        ]
    replace_section(section, "\n".join(lines))


if __name__ == "__main__":
    main()
