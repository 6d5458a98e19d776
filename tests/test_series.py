"""`lip inspect A B C ...` and `lip compare REF B C ...`: the paper's analysis on a series."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_head, save_problem
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from lip_cli import __version__
from lip_cli.cli import app
from lip_cli.demo import DemoSettings, make_demo_series, noise_folder
from lip_cli.errors import LipError
from lip_cli.jobs.compare import compare_series
from lip_cli.jobs.inspect import inspect_series, series_labels

runner = CliRunner(env={"COLUMNS": "200"})
narrow = CliRunner(env={"COLUMNS": "80"})


def run(*args: object, terminal: CliRunner = runner):
    return terminal.invoke(app, [str(arg) for arg in args])


def write_series(folder: Path, count: int = 3, shape: tuple[int, int] = (6, 12)) -> list[Path]:
    """Checkpoints whose `fc` spectra differ (a growing tail), each with a `body` layer too."""
    generator = torch.Generator().manual_seed(0)
    paths = []
    for index in range(count):
        weight = torch.randn(*shape, generator=generator)
        weight[-2:] *= 0.3 * (index + 1)
        state = {"body.weight": torch.randn(shape[1], 4, generator=generator), "fc.weight": weight}
        path = folder / f"p{index}.pt"
        torch.save(state, path)
        paths.append(path)
    return paths


def without_label(entry: dict) -> dict:
    return {key: value for key, value in entry.items() if key != "label"}


def unversioned(result) -> dict:
    """A command's JSON document less the version every document carries (its entries do not)."""
    document = json.loads(result.stdout)
    assert document.pop("lip_version") == __version__
    return document


@pytest.mark.parametrize("layer", [["--layer", "fc"], []])
def test_inspect_series_json_is_the_single_json_per_entry(tmp_path: Path, layer: list[str]) -> None:
    paths = write_series(tmp_path)
    result = run("inspect", *paths, *layer, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["layer"] == "fc" and len(document["checkpoints"]) == 3
    for path, entry in zip(paths, document["checkpoints"], strict=True):
        single = run("inspect", path, "--layer", "fc", "--json")
        assert without_label(entry) == unversioned(single)
        assert entry["label"] == path.stem
    weight = torch.load(paths[1], weights_only=True)["fc.weight"].double().numpy()
    expected = np.linalg.svd(weight, compute_uv=False)
    np.testing.assert_allclose(document["checkpoints"][1]["layer"]["singular_values"], expected, rtol=1e-6)


def test_one_checkpoint_keeps_its_documents(tmp_path: Path) -> None:
    [path] = write_series(tmp_path, count=1)
    table = json.loads(run("inspect", path, "--json").stdout)
    assert [layer["name"] for layer in table["layers"]] == ["body", "fc"]
    layer = unversioned(run("inspect", path, "--layer", "fc", "--json"))
    assert set(layer) == {
        "checkpoint",
        "layer",
        "samples",
        "labels_source",
        "k_curve",
        "targets",
        "provenance",
    }
    labelled = json.loads(run("inspect", path, "--label", "clean", "--json").stdout)
    assert [entry["label"] for entry in labelled["checkpoints"]] == ["clean"]
    assert without_label(labelled["checkpoints"][0]) == layer


def test_labels_name_the_series(tmp_path: Path) -> None:
    paths = write_series(tmp_path)
    names = ["p=0", "[bold]p=0.2", "p=0.4"]  # markup in a label is shown as written
    options = [part for name in names for part in ("--label", name)]
    document = json.loads(run("inspect", *paths, *options, "--json").stdout)
    assert [entry["label"] for entry in document["checkpoints"]] == names
    human = run("inspect", *paths, *options)
    assert human.exit_code == 0 and human.stderr == ""
    rows = [line for line in human.stdout.splitlines() if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in rows] == names
    wrong = run("inspect", *paths, "--label", "only-one")
    assert wrong.exit_code == 2 and "1 given for 3 checkpoints" in wrong.output


@pytest.mark.parametrize("command", ["inspect", "compare"])
@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["a", " ", "c"], "an empty label names nothing"),
        (["a", "", "c"], "an empty label names nothing"),
        (["a", "b", "a"], "'a' given twice"),
    ],
)
def test_labels_that_name_nothing_or_twice_are_usage_errors(
    tmp_path: Path, command: str, names: list[str], message: str
) -> None:
    paths = write_series(tmp_path)
    result = run(command, *paths, *[part for name in names for part in ("--label", name)], "--json")
    assert result.exit_code == 2 and message in " ".join(result.stderr.split())
    error = json.loads(result.stdout)["error"]  # under --json, a usage error is a document too
    assert error["exit_code"] == 2 and message in error["message"]


@pytest.mark.parametrize(
    ("paths", "names"),
    [
        (["a/p0.pt", "b/p1.pt"], ["p0", "p1"]),
        (["run1/model.pt", "run2/model.pt", "x.pt"], ["run1/model", "run2/model", "x"]),
        (["a/b/model.pt", "c/b/model.pt", "model.pt"], ["a/b/model", "c/b/model", "model"]),
        (["m.pt", "m.pt"], ["m (1)", "m (2)"]),
    ],
)
def test_default_labels_are_unique_stems(paths: list[str], names: list[str]) -> None:
    assert series_labels([Path(path) for path in paths]) == names


@given(st.lists(st.lists(st.sampled_from(["a", "b", "model"]), min_size=1, max_size=3), max_size=6))
def test_default_labels_are_unique_path_endings(parts: list[list[str]]) -> None:
    paths = [Path(*names).with_suffix(".pt") for names in parts]
    labels = series_labels(paths)
    assert len(set(labels)) == len(labels)
    for names, label in zip(parts, labels, strict=True):
        ending = label.split(" (")[0]
        assert "/".join(names).endswith(ending) and ending.endswith(names[-1])
        assert ("(" in label) == (parts.count(names) > 1)  # numbered only when given twice


def test_default_labels_of_model_pt_in_two_folders(tmp_path: Path) -> None:
    first, second = write_series(tmp_path, count=2)
    for name, path in (("clean", first), ("noisy", second)):
        (tmp_path / name).mkdir()
        path.rename(tmp_path / name / "model.pt")
    paths = [tmp_path / "clean" / "model.pt", tmp_path / "noisy" / "model.pt"]
    document = json.loads(run("inspect", *paths, "--json").stdout)
    assert [entry["label"] for entry in document["checkpoints"]] == ["clean/model", "noisy/model"]


def test_bad_entry_in_the_middle_fails_with_its_name_and_writes_nothing(tmp_path: Path) -> None:
    first, _, last = write_series(tmp_path)
    torch.save({"fc.weight": torch.randn(6, 9)}, tmp_path / "narrow.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    torch.save({"head.weight": torch.randn(6, 12)}, tmp_path / "other.pt")
    cases = [
        ("narrow.pt", ["is 6x12 in", "p0.pt but", "6x9 in", "narrow.pt; only layers of the same shape"]),
        ("broken.pt", ["broken.pt: not a readable .pt checkpoint"]),
        ("other.pt", ["other.pt: no layer `fc`"]),
        ("missing.pt", ["missing.pt: no such file"]),
    ]
    for bad, messages in cases:
        for command in (["inspect", "--layer", "fc"], ["compare"]):
            plot = tmp_path / "figure.png"
            result = run(command[0], first, tmp_path / bad, last, *command[1:], "--plot", plot, "--json")
            assert result.exit_code == 1, (command, bad, result.output)
            assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
            for message in messages:
                assert message in result.stderr, (command, result.stderr)
            assert json.loads(result.stdout)["error"]["exit_code"] == 1 and not plot.exists()


def test_features_take_one_checkpoint(tmp_path: Path) -> None:
    paths = write_series(tmp_path, count=2)
    np.save(tmp_path / "features.npy", np.zeros((4, 12), dtype=np.float32))
    result = run("inspect", *paths, "--features", tmp_path / "features.npy")
    assert result.exit_code == 2 and "takes one checkpoint" in result.output


def test_compare_series_json_is_the_pair_json_per_entry(tmp_path: Path) -> None:
    reference, *others = write_series(tmp_path, count=4)
    result = run("compare", reference, *others, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["reference"] == str(reference) and document["layer"] == "fc"
    assert len(document["comparisons"]) == 3 and document["labels"] == ["p0", "p1", "p2", "p3"]
    for other, entry in zip(others, document["comparisons"], strict=True):
        assert entry == unversioned(run("compare", reference, other, "--json"))
    human = run("compare", reference, *others)
    assert human.exit_code == 0 and human.stderr == ""
    assert "largest principal angle" in human.stdout and "p3" in human.stdout
    alone = run("compare", reference)
    assert alone.exit_code == 2
    names = ["clean", "[red]a", "b", "c"]
    options = [part for name in names for part in ("--label", name)]
    labelled = run("compare", reference, *others, *options, "--json")
    assert json.loads(labelled.stdout)["labels"] == names
    assert "[red]a" in run("compare", reference, *others, *options).stdout
    assert json.loads(labelled.stdout)["comparisons"] == document["comparisons"]
    pair = json.loads(run("compare", reference, others[0], "--label", "x", "--label", "y", "--json").stdout)
    assert pair["labels"] == ["x", "y"] and pair["comparisons"] == document["comparisons"][:1]
    wrong = run("compare", reference, *others, "--label", "x")
    assert wrong.exit_code == 2 and "1 given for 4 checkpoints" in wrong.output


def test_series_figure_has_a_line_per_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from lip_cli import plots

    paths = write_series(tmp_path)
    series = inspect_series(paths, "fc", ["a", "b", "c"])
    for normalize in (False, True):
        figure = plots.series_figure(series, normalize)
        spectra, energy = figure.axes
        for axis in (spectra, energy):
            assert [text.get_text() for text in axis.get_legend().get_texts()] == ["a", "b", "c"]
            assert len(axis.get_lines()) == 3
        for line, layer in zip(spectra.get_lines(), series.layers, strict=True):
            values = np.array(layer.spectrum.singular_values)
            expected = values / values[0] if normalize else values
            np.testing.assert_allclose(line.get_ydata(), expected, rtol=1e-12)
        plots._pyplot().close(figure)
    odd = inspect_series(paths, "fc", ["_hidden", "$\\notacommand$", "p=5$"])
    figure = plots.series_figure(odd)
    assert len(figure.axes[0].get_legend().get_texts()) == 3
    figure.savefig(io.BytesIO(), format="png")  # no mathtext error
    plots._pyplot().close(figure)


def test_comparison_figure_has_a_heatmap_per_comparison_on_one_scale(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from lip_cli import plots

    reference, *others = write_series(tmp_path, count=4)
    reports = compare_series(reference, others)
    figure = plots.comparison_series_figure(reports, series_labels([reference, *others]))
    images = [image for axis in figure.axes for image in axis.get_images()]
    assert len(images) == 3
    assert {image.get_clim() for image in images} == {(0, 1)}
    for image, report in zip(images, reports, strict=True):
        np.testing.assert_array_equal(image.get_array(), report.phi_matrix.numpy())
    assert [axis.get_title() for axis in figure.axes if axis.get_images()] == ["p1", "p2", "p3"]
    plots._pyplot().close(figure)


def test_series_pngs_decode(tmp_path: Path) -> None:
    image = pytest.importorskip("matplotlib.image")
    paths = write_series(tmp_path)
    for name, args in {
        "spectra.png": ["inspect", *paths, "--normalize"],
        "phi.png": ["compare", *paths],
    }.items():
        result = run(*args, "--plot", tmp_path / name)
        assert result.exit_code == 0, result.output
        pixels = image.imread(tmp_path / name)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line[:1] in "┏┃┡│└"]


def test_inspect_tables_fit_80_columns(tmp_path: Path) -> None:
    paths = write_series(tmp_path)
    (tmp_path / "fitted").mkdir()
    fitted = save_problem(tmp_path / "fitted", make_head())
    for args in (
        ["inspect", paths[0]],
        ["inspect", *paths],
        ["inspect", paths[0], "--layer", "fc"],
        ["inspect", fitted["model"], "--features", fitted["features"]],
    ):
        wide = run(*args)
        result = run(*args, terminal=narrow)
        assert result.exit_code == 0, result.output
        lines = table_lines(result.stdout)
        assert lines and all(len(line) <= 80 for line in lines)
        assert table_lines(wide.stdout) == lines  # nothing wrapped or cut to fit
        assert "…" not in "".join(lines)
    single = run("inspect", paths[0], terminal=narrow)
    assert "float32" in single.stdout and "fc ◀" in single.stdout


def test_demo_series_shares_everything_but_the_noise(tmp_path: Path) -> None:
    settings = DemoSettings(train_samples=200, val_samples=50, epochs=1)
    results = make_demo_series(tmp_path, [0.0, 0.5], settings=settings)
    assert [result.settings.noise_rate for result in results] == [0.0, 0.5]
    clean, noisy = (noise_folder(tmp_path, rate) for rate in (0.0, 0.5))
    assert clean.name == "noise-0" and noisy.name == "noise-0.5"
    for name in ("train/inputs.npy", "val/inputs.npy", "val/targets.npy"):
        np.testing.assert_array_equal(np.load(clean / name), np.load(noisy / name))
    flipped = np.load(clean / "train/targets.npy") != np.load(noisy / "train/targets.npy")
    assert 0.3 < flipped.mean() < 0.5  # half the labels drawn anew, a tenth of them to the same class
    with pytest.raises(LipError, match="pass --force"):
        make_demo_series(tmp_path, [0.2, 0.5], settings=settings)
    assert not noise_folder(tmp_path, 0.2).exists()  # refused before training any


def test_demo_noise_option(tmp_path: Path) -> None:
    for bad in ("0,x", "1.0", "0.2,0.2", "-0.1"):
        result = run("demo", tmp_path / "demo", "--noise", bad)
        assert result.exit_code == 2, (bad, result.output)
    assert not (tmp_path / "demo").exists()


def test_default_layer_is_the_first_ones_classifier_by_name(tmp_path: Path) -> None:
    first, second = write_series(tmp_path, count=2)
    state = torch.load(second, weights_only=True)
    state["head.weight"] = torch.randn(6, 12)  # second's own likely classifier would be `head`
    torch.save(state, second)
    document = json.loads(run("inspect", first, second, "--json").stdout)
    assert [entry["layer"]["name"] for entry in document["checkpoints"]] == ["fc", "fc"]
    assert unversioned(run("inspect", second, "--layer", "fc", "--json")) == without_label(
        document["checkpoints"][1]
    )


def test_demo_series_never_writes_through_a_noise_folder_linked_out(tmp_path: Path) -> None:
    """FOLDER/noise-P is a name lip chooses inside FOLDER: a link there to another folder is refused,
    with --force too, before any training, and the file out there is kept."""
    settings = DemoSettings(train_samples=200, val_samples=50, epochs=1)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model.pt").write_bytes(b"someone's model")
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "noise-0.5").symlink_to(outside)
    for force in (False, True):
        with pytest.raises(LipError, match="noise-0.5"):
            make_demo_series(folder, [0.0, 0.5], force=force, settings=settings)
    assert (outside / "model.pt").read_bytes() == b"someone's model"
    assert sorted(path.name for path in outside.iterdir()) == ["model.pt"]
    assert not noise_folder(folder, 0.0).exists()  # refused before training any


def test_demo_series_checks_every_folder_before_training(tmp_path: Path) -> None:
    """A later folder that cannot take the demo (a dangling link where a file goes, `train` a file)
    fails the run before the first model is trained."""
    settings = DemoSettings(train_samples=200, val_samples=50, epochs=1)
    later = noise_folder(tmp_path, 0.5)
    later.mkdir()
    (later / "model.pt").symlink_to(tmp_path / "nowhere.pt")
    with pytest.raises(LipError, match="pass --force"):
        make_demo_series(tmp_path, [0.0, 0.5], settings=settings)
    (later / "model.pt").unlink()
    (later / "train").write_text("not a folder")
    with pytest.raises(LipError, match="not a folder"):
        make_demo_series(tmp_path, [0.0, 0.5], force=True, settings=settings)
    assert not noise_folder(tmp_path, 0.0).exists()
    assert not (tmp_path / "nowhere.pt").exists()


def test_demo_series_rates_that_share_a_folder_are_refused(tmp_path: Path) -> None:
    """Two distinct rates written as the same FOLDER/noise-P: one model would silently replace the
    other (with --force), so the run is refused."""
    result = run("demo", tmp_path / "series", "--noise", "0.1234561,0.1234562", "--force")
    assert result.exit_code == 1, result.output
    assert "noise-0.123456" in result.stderr
    assert not (tmp_path / "series").exists()


@pytest.mark.parametrize("noise", [[], ["--noise", "0,0.2"]])
def test_demo_under_a_file_fails_in_one_line(tmp_path: Path, noise: list[str]) -> None:
    """FOLDER (or a folder above it) is a file: one line, exit 1, before any training."""
    (tmp_path / "taken").write_text("a file")
    for folder in (tmp_path / "taken", tmp_path / "taken" / "sub"):
        result = run("demo", folder, *noise)
        assert result.exit_code == 1, result.output
        assert isinstance(result.exception, SystemExit), result.exception  # not a traceback
        assert "taken: exists and is not a folder" in result.stderr
    assert (tmp_path / "taken").read_text() == "a file"


@pytest.mark.parametrize("name", ["model.pt", "val/targets.npy"])
def test_demo_force_over_a_folder_named_like_a_demo_file_fails_in_one_line(tmp_path: Path, name: str) -> None:
    """--force replaces demo files, never a folder in their place: one line, exit 1, before training."""
    (tmp_path / "demo" / name).mkdir(parents=True)
    result = run("demo", tmp_path / "demo", "--force")
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not a traceback
    assert f"{name}: is a folder" in result.stderr
    assert (tmp_path / "demo" / name).is_dir() and not (tmp_path / "demo" / "train").exists()
