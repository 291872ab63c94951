"""Import a FaCT artifact into the BentoML model store: ``python -m service.store [ARTIFACT] [--name NAME]``.

The service serves ``fact-default:latest`` from the store (``FACT_MODEL_TAG``), and
``bentoml build`` packs it into the Bento. Importing the same weights twice is a
no-op (the latest version's ``weights_sha256`` label is compared).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import bentoml

from fact_model.artifacts import read_manifest, resolve_artifact_path

__all__ = ["import_artifact", "main"]


def import_artifact(artifact: str | Path = "default", name: str = "fact-default") -> str:
    """Copy an artifact directory into the store; returns the model tag."""
    directory = resolve_artifact_path(artifact)
    manifest = read_manifest(directory)
    sha = manifest["weights"]["sha256"]
    try:
        latest = bentoml.models.get(f"{name}:latest")
        if latest.info.labels.get("weights_sha256") == sha:
            return str(latest.tag)
    except bentoml.exceptions.NotFound:
        pass
    layers = manifest.get("concept_layers", [])
    labels = {
        "arch": manifest["model"]["backbone"],
        "layers": ",".join(layer["name"] for layer in layers),
        "K": ",".join(str(layer["num_concepts"]) for layer in layers),
        "k": ",".join(str(layer["k"]) for layer in layers),
        "classes": str(manifest.get("num_classes")),
        "weights_sha256": sha,
    }
    with bentoml.models.create(name, labels=labels, metadata={"source": str(directory)}) as model:
        for item in directory.iterdir():
            if item.is_file():
                shutil.copy2(item, Path(model.path) / item.name)
    return str(model.tag)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("artifact", nargs="?", default="default", help="artifact directory or 'default'")
    parser.add_argument("--name", default="fact-default", help="model name in the store")
    args = parser.parse_args(argv)
    try:
        print(import_artifact(args.artifact, args.name))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
