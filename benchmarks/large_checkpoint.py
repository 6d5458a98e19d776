"""What `lip inspect` of a large torch checkpoint reads and holds: peak RSS (VmHWM) and bytes read
(/proc/self/io: rchar, what read() returned; read_bytes, what came from the disk) of one child
process per command, side by side with torch.load of the same file, in one run.

    python benchmarks/large_checkpoint.py [--gigabytes 1.0] [--folder /tmp] [--all-layers]
        [--out benchmarks/large_checkpoint.json]   (Linux only)

docs/speed.md's "Reading a large checkpoint" table is written from the --out file by
benchmarks/speed_page.py.

The checkpoint: a Lightning-like {"state_dict": ..., "epoch": ...} of float32 layers that add up to
the size asked for, with a 1000 x 2048 head `fc` last. The tensors lip does not need are mapped
from the file, never read; the pickle is walked without building it (torch_pickle).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = """
import json, sys
def probe():
    status = open('/proc/self/status').read()
    io = dict(line.split(': ') for line in open('/proc/self/io').read().splitlines())
    rss = {key: int(status.split(key + ':')[1].split()[0]) * 1024 for key in ('VmHWM', 'RssFile', 'RssAnon')}
    return {**rss, 'rchar': int(io['rchar']), 'read_bytes': int(io['read_bytes'])}
"""

RUNS = {
    "imports only (lip_cli.cli, torch)": "from lip_cli.cli import app\nimport torch",
    "lip inspect --layer fc": (
        "from lip_cli.cli import app\nimport contextlib, io\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    app(['inspect', sys.argv[1], '--layer', 'fc', '--json'], standalone_mode=False)"
    ),
    "lip inspect (every 2-D layer)": (
        "from lip_cli.cli import app\nimport contextlib, io\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    app(['inspect', sys.argv[1], '--json'], standalone_mode=False)"
    ),
    "torch.load(weights_only=True)": "import torch\ntorch.load(sys.argv[1], weights_only=True)",
    "torch.load(weights_only=True, mmap=True), head only": (
        "import torch\nstate = torch.load(sys.argv[1], weights_only=True, mmap=True)['state_dict']\n"
        "float(state['fc.weight'].sum())"
    ),
}


def make_checkpoint(path: Path, gigabytes: float) -> int:
    import torch

    layers, total, index = {}, int(gigabytes * 2**30), 0
    generator = torch.Generator().manual_seed(0)
    while sum(t.numel() * 4 for t in layers.values()) < total - 1000 * 2048 * 4:
        layers[f"blocks.{index}.weight"] = torch.randn(2048, 4096, generator=generator)
        index += 1
    layers["fc.weight"] = torch.randn(1000, 2048, generator=generator) * 0.02
    layers["fc.bias"] = torch.zeros(1000)
    torch.save({"state_dict": layers, "epoch": 3}, path)
    return path.stat().st_size


def measure(code: str, path: Path) -> dict:
    script = PROBE + code + "\nprint(json.dumps(probe()))\n"
    out = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument(
        "--all-layers", action="store_true", help="also `lip inspect` of every 2-D layer (slow: SVDs)"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=options.folder) as folder:
        path = Path(folder) / "large.ckpt"
        size = make_checkpoint(path, options.gigabytes)
        print(f"checkpoint: {size / 2**20:,.0f} MiB ({path.name})")
        print(f"{'run':<52} {'peak RSS MiB':>12} {'file-backed MiB':>15} {'read() MiB':>10} {'disk MiB':>8}")
        results = {}
        for name, code in RUNS.items():
            if name.startswith("lip inspect (every") and not options.all_layers:
                continue
            found = measure(code, path)
            results[name] = found
            print(
                f"{name:<52} {found['VmHWM'] / 2**20:>12,.0f} {found['RssFile'] / 2**20:>15,.0f} "
                f"{found['rchar'] / 2**20:>10,.1f} {found['read_bytes'] / 2**20:>8,.1f}"
            )
        command = "python benchmarks/large_checkpoint.py --gigabytes " + f"{options.gigabytes}"
        document = {"command": command, "checkpoint_bytes": size, "runs": results}
        print(json.dumps(document))
        if options.out:
            options.out.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
