"""Check an export: its files against the manifest, and that the weights load."""

from __future__ import annotations

import json
from pathlib import Path

from ._hf_plan import INDEX_NAME, WEIGHTS_NAME
from ._manifest import check_files, read_manifest


def verify_export(path: str | Path, *, load_tensors: bool = True) -> list[str]:
    """Problems found in the export at ``path``; an empty list means it is whole and loads.

    Checks every file's size and sha256 against the manifest, no file outside it, and for
    Hugging Face exports that the index and the safetensors headers agree (every tensor in
    exactly one file) and, with ``load_tensors``, that every tensor reads back.
    """
    directory = Path(path)
    try:
        manifest = read_manifest(directory)
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as err:
        return [str(err)]
    problems = check_files(directory)
    if problems:
        return problems
    if manifest.get("kind") == "hf":
        problems += _check_safetensors(directory, load_tensors)
    elif manifest.get("kind") == "dcp":
        problems += _check_dcp(directory, load_tensors)
    return problems


def _check_safetensors(directory: Path, load_tensors: bool) -> list[str]:
    from safetensors import safe_open

    problems: list[str] = []
    index_path = directory / INDEX_NAME
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (directory / WEIGHTS_NAME).is_file():
        weight_map, files = None, [WEIGHTS_NAME]
    else:
        return [f"no {WEIGHTS_NAME} and no {INDEX_NAME}"]
    owner: dict[str, str] = {}
    for file in files:
        try:
            with safe_open(str(directory / file), framework="pt") as f:
                if (f.metadata() or {}).get("format") != "pt":
                    problems.append(f"{file}: header metadata lacks format=pt")
                for key in f.keys():
                    if key in owner:
                        problems.append(f"{key}: in both {owner[key]} and {file}")
                    owner[key] = file
                    if load_tensors:
                        f.get_tensor(key)
        except Exception as err:  # noqa: BLE001 - any failure to read is a finding
            problems.append(f"{file}: does not load ({err})")
    if weight_map is not None:
        for key, file in weight_map.items():
            if owner.get(key) != file:
                problems.append(f"{key}: index says {file}, found in {owner.get(key)}")
        for key in set(owner) - set(weight_map):
            problems.append(f"{key}: in {owner[key]} but not in the index")
    return problems


def _check_dcp(directory: Path, load_tensors: bool) -> list[str]:
    from ._sources import dcp_tensor_metadata, read_dcp_tensor

    try:
        tensors = dcp_tensor_metadata(directory)
        if load_tensors:
            for fqn, (shape, dtype) in tensors.items():
                read_dcp_tensor(directory, fqn, shape, dtype)
    except Exception as err:  # noqa: BLE001
        return [f"DCP checkpoint does not load: {err}"]
    return []
