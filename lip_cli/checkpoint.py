"""Checkpoints: read them safely, find the classifier layer, write a patched copy atomically.

Formats, recognised by content whatever the name (`.pt`, `.pth`, `.ckpt`, `.pth.tar`, `.bin`...,
see formats.py): a torch file, zip archive or legacy pickle, holding a state dict (also nested under
a key such as `state_dict` or `model`), read symbolically (torch_pickle: nothing in its pickle is
built or run, tensors are mapped from their storages) and written back by replacing the bytes of the
changed tensors only, so that the pickle and every other record stay byte for byte as they were;
safetensors (metadata kept); and Hugging Face model folders (`model.safetensors`,
`pytorch_model.bin`, or the shards listed in their `.index.json`), written back as a new folder in
which only the shard holding the layer is rewritten. Every tensor that is not patched is written
back bit for bit.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lip_cli import formats, torch_pickle
from lip_cli.errors import LipError, first_line
from lip_cli.files import LIP_RECORD, copy_folder, member
from lip_cli.writes import atomic_folder, atomic_outputs

WRAPPER_PREFIXES = ("model.", "module.", "_orig_mod.", "net.", "network.")  # Lightning, DDP, compile
EMA_COMPONENTS = {"ema", "model_ema", "ema_model", "ema_state_dict", "shadow"}
HEAD_NAMES = {"fc", "head", "head.fc", "heads.head", "classifier", "score"}  # plus classifier.<N>
NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "network", "weights")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".tar", ".safetensors")  # usual names only


@dataclass
class Checkpoint:
    """A loaded checkpoint: its flat state dict and what is needed to write it back as it was."""

    path: Path
    format: str  # "pt" (a torch file), "safetensors" or "hf" (a Hugging Face model folder)
    state: dict[str, Tensor]
    legacy: bool = False  # pt: the pre-1.6 pickle serialization, kept on writing
    nested_key: str | None = None  # pt: the key of the file's top dict that holds `state`
    torch_files: dict[str, torch_pickle.TorchFile] = field(default_factory=dict)  # "" or hf: per shard
    refs: dict[str, torch_pickle.TensorRef] = field(default_factory=dict)  # tensors of torch files
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors header metadata
    shard_of: dict[str, str] = field(default_factory=dict)  # hf: tensor name -> shard file
    shard_metadata: dict[str, dict[str, str]] = field(default_factory=dict)  # hf: per shard
    shard_format: dict[str, str] = field(default_factory=dict)  # hf: formats.* of each shard


@dataclass(frozen=True)
class LinearLayer:
    """A 2-D weight (torch layout: out_features x in_features) and its bias, by module path."""

    name: str
    weight_key: str
    bias_key: str | None
    out_features: int
    in_features: int
    dtype: torch.dtype

    @property
    def shape_text(self) -> str:
        return f"{self.out_features}x{self.in_features}"


def _is_state_dict(value: object) -> bool:
    tensors = (Tensor, torch_pickle.TensorRef, torch_pickle.UnusableTensor)
    return isinstance(value, dict) and any(isinstance(v, tensors) for v in value.values())


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint file without running any pickled code."""
    path = Path(path)
    if not path.exists():
        raise LipError(f"{path}: no such file")
    if path.is_dir():
        try:
            return _load_hf_folder(path)
        except LipError:
            raise
        except Exception as error:  # safetensors and json have their own error types
            raise LipError(
                f"{path}: not a readable Hugging Face model folder ({first_line(error)})"
            ) from error
    if path.stat().st_size == 0:
        raise LipError(f"{path}: file is empty")
    kind = formats.detect_format(path)
    if kind not in (formats.SAFETENSORS, *formats.TORCH_FORMATS):
        known = "a torch file (zip or legacy pickle) or a safetensors file"
        if path.suffix.lower() in CHECKPOINT_SUFFIXES:
            raise LipError(f"{path}: not a readable {path.suffix} checkpoint (its bytes are not {known})")
        what = f"a numpy .{kind} file" if kind else "not recognised"
        raise LipError(f"{path}: unknown checkpoint format ({what}); lip reads {known}, or a model folder")
    try:
        if kind == formats.SAFETENSORS:
            return _load_safetensors(path)
        return _load_torch(path, legacy=kind == formats.TORCH_PICKLE)
    except LipError:
        raise
    except torch_pickle.CorruptPickle as error:
        raise LipError(f"{path}: not a readable {kind} checkpoint: it is corrupt ({error})") from error
    except Exception as error:  # each loader has its own error types for a corrupt file
        raise LipError(f"{path}: not a readable {kind} checkpoint ({first_line(error)})") from error


def writes_sidecar(path: Path) -> bool:
    """Whether repairing this checkpoint records provenance in a `<output>.lip.json` sidecar: a torch
    file, which has no metadata of its own (safetensors and folders keep it inside)."""
    path = Path(path)
    return path.is_file() and formats.detect_format(path) in formats.TORCH_FORMATS


def _load_safetensors(path: Path) -> Checkpoint:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        if "lip_baseline" in metadata:  # lip_cli.baseline.MARKER
            raise LipError(
                f"{path}: a lip baseline (lip inspect --save-baseline), not a checkpoint; only lip compare "
                "takes it, as the reference"
            )
        state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    return Checkpoint(path=path, format="safetensors", state=state, metadata=metadata)


# The weight files of a Hugging Face model folder, in the order transformers looks for them
# (modeling_utils: model.safetensors, its index, pytorch_model.bin, its index); a `.bin` is a torch
# file, loaded with weights_only=True.
HF_LAYOUTS = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)


def _hf_layouts(path: Path) -> list[tuple[list[str], dict[str, str] | None, str]]:
    """Each weight layout present in a model folder, in transformers' order of preference: its shard
    files, its index's weight map (None for a single file) and the index's (or file's) name."""
    found = []
    for single, index in HF_LAYOUTS:  # transformers takes a single file before an index of shards
        if member(path, single).exists():
            found.append(([single], None, single))
        if member(path, index).exists():
            weight_map = json.loads(member(path, index).read_text())["weight_map"]
            found.append((sorted(set(weight_map.values())), weight_map, index))
    for shards, _, index in found:  # every layout is read or rewritten: each checked before any work
        for shard in shards:
            if not member(path, shard).is_file():
                raise LipError(f"{path}: {index} names shard {shard}, which is missing or not a file")
    return found


@dataclass
class _Shard:
    """One weight file of a model folder: its tensors, safetensors metadata and format; for a torch
    file, the file as read and where each tensor lies in it."""

    state: dict[str, Tensor]
    metadata: dict[str, str]
    kind: str
    torch_file: torch_pickle.TorchFile | None = None
    refs: dict[str, torch_pickle.TensorRef] = field(default_factory=dict)


def _load_shard(file: Path) -> _Shard:
    kind = formats.detect_format(file)
    if kind == formats.SAFETENSORS:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            return _Shard(state, dict(handle.metadata() or {}), kind)
    if kind in formats.TORCH_FORMATS:
        torch_file = _read_torch(file, kind)
        if not _is_state_dict(torch_file.root):
            raise LipError(f"{file}: holds no state dict (a dict of tensors)")
        state, refs = torch_pickle.tensors_of(torch_file, torch_file.root)  # type: ignore[arg-type]
        return _Shard(state, {}, kind, torch_file, refs)
    raise LipError(f"{file}: is neither a safetensors file nor a torch file")


def _read_torch(file: Path, kind: str) -> torch_pickle.TorchFile:
    try:
        return torch_pickle.read_torch_file(file)
    except torch_pickle.CorruptPickle as error:
        raise LipError(f"{file}: not a readable {kind} file: it is corrupt ({error})") from error


def _load_hf_folder(path: Path) -> Checkpoint:
    if member(path, LIP_RECORD).is_dir():  # where the output's record goes: refused before any work
        raise LipError(f"{path / LIP_RECORD}: is a folder; lip keeps its record there, move it")
    layouts = _hf_layouts(path)
    if not layouts:
        names = [name for layout in HF_LAYOUTS for name in layout]
        raise LipError(
            f"{path}: is a folder without {', '.join(names[:-1])} or {names[-1]}; lip reads checkpoint "
            "files and Hugging Face model folders"
        )
    shards, weight_map, index = layouts[0]
    state: dict[str, Tensor] = {}
    shard_of: dict[str, str] = {}
    shard_metadata: dict[str, dict[str, str]] = {}
    shard_format: dict[str, str] = {}
    torch_files: dict[str, torch_pickle.TorchFile] = {}
    refs: dict[str, torch_pickle.TensorRef] = {}
    for shard in shards:
        loaded = _load_shard(member(path, shard))
        shard_metadata[shard], shard_format[shard] = loaded.metadata, loaded.kind
        if loaded.torch_file is not None:
            torch_files[shard] = loaded.torch_file
            refs.update(loaded.refs)
        for key, tensor in loaded.state.items():
            state[key], shard_of[key] = tensor, shard
    if weight_map is not None:
        wrong = [key for key, shard in weight_map.items() if shard_of.get(key) != shard]
        if wrong:
            raise LipError(f"{path}: {index} places `{wrong[0]}` in a shard that does not hold it")
    return Checkpoint(
        path=path,
        format="hf",
        state=state,
        shard_of=shard_of,
        shard_metadata=shard_metadata,
        shard_format=shard_format,
        torch_files=torch_files,
        refs=refs,
    )


def _load_torch(path: Path, legacy: bool) -> Checkpoint:
    torch_file = _read_torch(path, formats.TORCH_PICKLE if legacy else formats.TORCH_ZIP)
    root, nested_key = torch_file.root, None
    tensors = (torch_pickle.TensorRef, torch_pickle.UnusableTensor)
    if isinstance(root, dict) and not all(isinstance(value, tensors) for value in root.values()):
        # a training state beside its tensors (an RNG state...): the state dict under its key first
        nested_key = next((key for key in NESTED_KEYS if _is_state_dict(root.get(key))), None)
        root = root[nested_key] if nested_key is not None else root
    if not _is_state_dict(root):
        raise LipError(
            f"{path}: holds no state dict (a dict of tensors, at the top or under one of "
            f"{', '.join(NESTED_KEYS)})"
        )
    state, refs = torch_pickle.tensors_of(torch_file, root)  # type: ignore[arg-type]
    return Checkpoint(
        path=path,
        format="pt",
        legacy=legacy,
        state=state,
        nested_key=nested_key,
        torch_files={"": torch_file},
        refs=refs,
    )


def linear_layers(state: dict[str, Tensor]) -> list[LinearLayer]:
    """Every 2-D `<name>.weight` in a state dict, with its `<name>.bias` when it fits."""
    layers = []
    for key, tensor in state.items():
        if (
            not isinstance(key, str)
            or not isinstance(tensor, Tensor)
            or tensor.ndim != 2
            or not key.endswith("weight")
        ):
            continue
        name = key[: -len(".weight")] if key.endswith(".weight") else key
        bias_key = f"{name}.bias"
        bias = state.get(bias_key)
        has_bias = isinstance(bias, Tensor) and tuple(bias.shape) == (tensor.shape[0],)
        layers.append(
            LinearLayer(
                name=name,
                weight_key=key,
                bias_key=bias_key if has_bias else None,
                out_features=int(tensor.shape[0]),
                in_features=int(tensor.shape[1]),
                dtype=tensor.dtype,
            )
        )
    return layers


def _listing(layers: list[LinearLayer], limit: int = 8) -> str:
    shown = ", ".join(f"{layer.name} ({layer.shape_text})" for layer in layers[:limit])
    more = f" and {len(layers) - limit} more" if len(layers) > limit else ""
    return shown + more if shown else "none"


def is_ema(name: str) -> bool:
    """Whether a module path belongs to an exponential-moving-average copy of the model."""
    return any(
        part in EMA_COMPONENTS or part.startswith("ema_") or part.endswith("_ema") for part in name.split(".")
    )


def canonical_name(name: str) -> str:
    """The module path without wrapper prefixes (model., module., _orig_mod.) and EMA parts."""
    parts = [part for part in name.split(".") if not is_ema(part)]
    bare = ".".join(parts)
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if bare.startswith(prefix):
                bare, stripped = bare[len(prefix) :], True
    return bare


def is_head_name(name: str) -> bool:
    """A classifier name of torchvision, timm or transformers (fc, head, classifier.1, score...)."""
    bare = canonical_name(name)
    return bare in HEAD_NAMES or (bare.startswith("classifier.") and bare.split(".")[1].isdigit())


def layer_by_name(checkpoint: Checkpoint, name: str) -> LinearLayer:
    """The 2-D layer at a module path (`fc`, `fc.weight`) or a unique suffix of one (`fc` finds
    `model.fc` when it is the only match); otherwise an error listing the candidates."""
    layers = linear_layers(checkpoint.state)
    wanted = name.removesuffix(".weight")
    layer = next((layer for layer in layers if layer.name == wanted), None)
    if layer is not None:
        return layer
    suffixed = [layer for layer in layers if layer.name.endswith("." + wanted)]
    if len(suffixed) == 1:
        return suffixed[0]
    if suffixed:
        raise LipError(
            f"{checkpoint.path}: `{wanted}` matches several layers: {_listing(suffixed)}; "
            "pass the full name to --layer"
        )
    for key in (f"{wanted}.weight", wanted):
        value = checkpoint.state.get(key)
        if isinstance(value, Tensor):
            raise LipError(
                f"{checkpoint.path}: `{key}` has shape {tuple(value.shape)}; the classifier layer must be 2-D"
            )
    raise LipError(f"{checkpoint.path}: no layer `{wanted}`; 2-D layers: {_listing(layers)}")


def likely_classifier(checkpoint: Checkpoint) -> LinearLayer:
    """The last 2-D layer with a common head name, else the last 2-D layer; EMA copies last."""
    layers = linear_layers(checkpoint.state)
    if not layers:
        raise LipError(f"{checkpoint.path}: holds no 2-D weight")
    for group in (
        [layer for layer in layers if is_head_name(layer.name) and not is_ema(layer.name)],
        [layer for layer in layers if not is_ema(layer.name)],
        layers,
    ):
        if group:
            return group[-1]
    raise AssertionError("unreachable")


def copies_of(checkpoint: Checkpoint, layer: LinearLayer) -> list[LinearLayer]:
    """Other layers that are the same layer under another wrapper or an EMA copy of it."""
    return [
        other
        for other in linear_layers(checkpoint.state)
        if other.name != layer.name
        and canonical_name(other.name) == canonical_name(layer.name)
        and (other.out_features, other.in_features) == (layer.out_features, layer.in_features)
    ]


def find_layer(
    checkpoint: Checkpoint,
    name: str | None,
    in_features: int,
    num_classes: int | None,
    min_classes: int = 1,
) -> LinearLayer:
    """The classifier layer: the one named, or the only 2-D weight that fits the features and labels.

    `num_classes` is fixed by a label matrix; with class ids only `min_classes` (max id + 1) is known.
    """
    if name is not None:
        layer = layer_by_name(checkpoint, name)
        if layer.in_features != in_features:
            raise LipError(
                f"{checkpoint.path}: `{layer.weight_key}` is {layer.shape_text} (classes x inputs) but the "
                f"features have {in_features} columns; pass --layer to choose another layer"
            )
        return layer
    layers = linear_layers(checkpoint.state)
    path = checkpoint.path

    def fits(layer: LinearLayer) -> bool:
        if layer.in_features != in_features:
            return False
        return layer.out_features == num_classes if num_classes else layer.out_features >= min_classes

    matches = [layer for layer in layers if fits(layer)]
    if len(matches) == 1:
        return matches[0]
    preferred = [layer for layer in matches if is_head_name(layer.name) and not is_ema(layer.name)]
    if len(preferred) == 1:
        return preferred[0]
    wanted_classes = f"{num_classes}" if num_classes else f"at least {min_classes}"
    if not matches:
        raise LipError(
            f"{path}: no 2-D layer takes {in_features} inputs to {wanted_classes} classes; "
            f"2-D layers: {_listing(layers)}; pass --layer"
        )
    raise LipError(
        f"{path}: several layers take {in_features} inputs to {wanted_classes} classes: "
        f"{_listing(matches)}; pass --layer to choose one"
    )


def write_checkpoint(
    checkpoint: Checkpoint, updates: dict[str, Tensor], output: Path, provenance: dict | None = None
) -> None:
    """Write the checkpoint with `updates` replacing tensors, in its own format, atomically.

    `provenance` (what lip did) goes into the safetensors metadata under "lip", into `lip.json`
    inside a Hugging Face folder, or into a `<output>.lip.json` sidecar beside a .pt file.
    """
    state = dict(checkpoint.state)
    for key, tensor in updates.items():
        old = state[key]
        if tensor.shape != old.shape or tensor.dtype != old.dtype:
            raise ValueError(f"update of {key} changes its shape or dtype")
        state[key] = tensor.contiguous()
    record = {} if provenance is None else {"lip": json.dumps(provenance, sort_keys=True)}
    if checkpoint.format == "hf":
        _write_hf_folder(checkpoint, state, set(updates), output, record)
        return
    sidecar = checkpoint.format == "pt" and provenance is not None
    with atomic_outputs(output, *([sidecar_path(output)] if sidecar else [])) as temporaries:
        if checkpoint.format == "safetensors":
            from safetensors.torch import save_file

            save_file(state, str(temporaries[0]), metadata={"format": "pt", **checkpoint.metadata, **record})
        else:
            _patch_torch(
                checkpoint, checkpoint.torch_files[""], {key: state[key] for key in updates}, temporaries[0]
            )
        if sidecar:  # written before either is put in place: both land, or neither
            temporaries[1].write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")


def _patch_torch(
    checkpoint: Checkpoint, torch_file: torch_pickle.TorchFile, updates: dict[str, Tensor], target: Path
) -> None:
    """A copy of a torch file in which only the storage bytes of the updated tensors change; refused
    when another tensor of the file shares those bytes (tied weights), which would change with them."""
    refs = [checkpoint.refs[key] for key in updates]
    for key, ref in zip(updates, refs, strict=True):
        other = torch_pickle.sharing(torch_file, ref, refs)
        if other is not None:
            raise LipError(
                f"{checkpoint.path}: `{key}` shares its storage with another tensor of the file ({other}: "
                "tied weights), which would change with it; save the checkpoint with the layer cloned "
                "(untied), or as .safetensors, then repair again"
            )
    torch_pickle.patch_storages(torch_file, list(zip(refs, updates.values(), strict=True)), target)


def _write_hf_folder(
    checkpoint: Checkpoint, state: dict[str, Tensor], changed: set[str], output: Path, record: dict
) -> None:
    """A copy of the folder in which only the shards holding changed tensors are rewritten, in the
    layout lip read and in any other layout of the same model there (pytorch_model.bin beside
    model.safetensors), so that no stale copy of the layer is left behind."""
    for shards, _, name in _hf_layouts(checkpoint.path):
        if record and LIP_RECORD in shards:
            raise LipError(
                f"{checkpoint.path}: {name} names a weight file {LIP_RECORD}, where lip keeps its record; "
                "rename that shard"
            )
    with atomic_folder(output) as folder:
        copy_folder(checkpoint.path, folder)
        for shard in sorted({checkpoint.shard_of[key] for key in changed}):
            target = member(folder, shard)
            target.unlink()
            if checkpoint.shard_format[shard] == formats.SAFETENSORS:
                tensors = {key: state[key] for key, owner in checkpoint.shard_of.items() if owner == shard}
                _save_safetensors(tensors, target, {**checkpoint.shard_metadata[shard], **record})
            else:
                held = {key: state[key] for key in changed if checkpoint.shard_of[key] == shard}
                _patch_torch(checkpoint, checkpoint.torch_files[shard], held, target)
        for shards, _, name in _hf_layouts(checkpoint.path)[1:]:
            remaining = {key: state[key] for key in changed}
            for shard in shards:
                loaded = _load_shard(member(checkpoint.path, shard))
                held = {}
                for key in [key for key in remaining if key in loaded.state]:
                    if loaded.state[key].shape != remaining[key].shape:
                        raise LipError(f"{checkpoint.path}: `{key}` has another shape in {name}")
                    held[key] = remaining.pop(key).to(loaded.state[key].dtype)
                if not held:
                    continue
                target = member(folder, shard)
                target.unlink()
                if loaded.torch_file is None:
                    _save_safetensors({**loaded.state, **held}, target, {**loaded.metadata, **record})
                else:
                    other = Checkpoint(
                        path=checkpoint.path / shard, format="pt", state=loaded.state, refs=loaded.refs
                    )
                    _patch_torch(other, loaded.torch_file, held, target)
            if remaining:
                raise LipError(
                    f"{checkpoint.path}: {name} holds the model too, but not `{next(iter(remaining))}`; "
                    f"move {name} and its shards out of the folder, then repair again"
                )
        if record:
            member(folder, LIP_RECORD).write_text(
                json.dumps(json.loads(record["lip"]), indent=2, sort_keys=True) + "\n"
            )


def _save_safetensors(tensors: dict[str, Tensor], target: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(target), metadata={"format": "pt", **metadata})


def sidecar_path(output: Path) -> Path:
    """Where the provenance of a .pt output goes: `<output>.lip.json` (`.` and `..` by their real
    names; `/` has no place beside it, so its sidecar is inside)."""
    path = Path(output) if Path(output).name else Path(os.path.abspath(output))
    return path / ".lip.json" if not path.name else path.with_name(path.name + ".lip.json")


def read_provenance(path: Path) -> dict | None:
    """What lip recorded when it wrote this checkpoint, if it did: a JSON object of plain values."""
    path = Path(path)
    try:
        if path.is_dir():
            record = member(path, LIP_RECORD)
            text = record.read_text() if record.exists() else None
        elif path.is_file() and formats.detect_format(path) == formats.SAFETENSORS:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                text = (handle.metadata() or {}).get("lip")
        else:
            sidecar = sidecar_path(path)
            text = sidecar.read_text() if os.path.exists(sidecar) else None  # none past NAME_MAX
        provenance = json.loads(text, parse_constant=_refuse_constant) if text else None
    except (OSError, ValueError, RecursionError) as error:
        raise LipError(f"{path}: its lip provenance record is unreadable ({first_line(error)})") from error
    if provenance is not None and not isinstance(provenance, dict):
        raise LipError(
            f"{path}: its lip provenance record is a JSON {type(provenance).__name__}, not an object"
        )
    return provenance


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON value")
