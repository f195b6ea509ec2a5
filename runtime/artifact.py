"""Opening an exported artifact: the manifest checked before any session exists.

Checks, each failing with an ArtifactError that names the directory and the file at fault:
  the directory exists and has manifest.json (a checkpoint directory is recognized and pointed to `vl2edge export`);
  format and format_version are the ones this runtime reads;
  every file the manifest lists exists with its size and (verify="sha256", the default) its sha256;
  every graph file the manifest references is among the listed files;
  (check_onnxruntime, before the first session) the installed onnxruntime is at least the manifest's
  onnxruntime.min, the oldest release whose ops the graphs use (contract/ort_compat.py).
verify="size" skips hashing for fast starts on a trusted disk (hashing reads the whole artifact once).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..contract.manifest import FORMAT, MANIFEST, READABLE_FORMAT_VERSIONS, file_sha256
from ..contract.ort_compat import LEGACY_FLOOR, parse_version, version_str


class ArtifactError(ValueError):
    """A missing, corrupt or mismatched artifact."""


@dataclass(frozen=True)
class Artifact:
    dir: Path
    manifest: dict

    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def config(self) -> dict:
        return self.manifest["source"]["config"]

    def graph_files(self) -> list[str]:
        g = self.manifest["graphs"]
        files = [g["vision"]["file"], g["embedding"]["file"], g["head"]["file"]]
        files += [p["file"] for p in g.get("vision_parts", [])]
        for layer in g["layers"]:
            files += [layer["attention"]["file"], layer["mlp"]["file"]]
            files += [layer["layer"]["file"]] if "layer" in layer else []
        return files


def open_artifact(path, verify: str = "sha256") -> Artifact:
    d = Path(path).expanduser()
    if not d.is_dir():
        raise ArtifactError(f"{d}: no such artifact directory")
    mpath = d / MANIFEST
    if not mpath.is_file():
        if (d / "config.json").is_file() and any(d.glob("*.safetensors")):
            raise ArtifactError(f"{d} is a checkpoint, not an exported artifact: run `vl2edge export {d} OUT` "
                                f"first, or use --backend torch")
        raise ArtifactError(f"{d}: no {MANIFEST} (not a vl2edge artifact, or an export that did not finish)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mpath}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise ArtifactError(f"{mpath}: format_version {manifest.get('format_version')!r}; this runtime reads "
                            f"versions {list(READABLE_FORMAT_VERSIONS)} (re-export with this vl2edge)")
    files = manifest.get("files", {})
    for name, meta in files.items():
        f = d / name
        if not f.is_file():
            raise ArtifactError(f"{d}: missing file {name!r} listed in the manifest")
        if f.stat().st_size != meta["bytes"]:
            raise ArtifactError(f"{f}: {f.stat().st_size} bytes, the manifest says {meta['bytes']} (truncated or "
                                f"replaced)")
        if verify == "sha256" and file_sha256(f) != meta["sha256"]:
            raise ArtifactError(f"{f}: sha256 does not match the manifest (corrupt or modified)")
    art = Artifact(d, manifest)
    for name in art.graph_files():
        if name not in files:
            raise ArtifactError(f"{mpath}: graph {name!r} is not among the manifest's files")
    return art


def required_onnxruntime(manifest: dict) -> str:
    """The oldest onnxruntime the artifact's graphs load on; artifacts from before the manifest said so were made
    with (and for) the pinned release of their day."""
    return (manifest.get("onnxruntime") or {}).get("min") or version_str(LEGACY_FLOOR)


def check_onnxruntime(art: Artifact, installed: str) -> None:
    """One line naming both versions and the way out, instead of onnxruntime's schema error on the first graph
    an older release does not know."""
    need = required_onnxruntime(art.manifest)
    if parse_version(installed) < parse_version(need):
        raise ArtifactError(f"{art.dir} needs onnxruntime >= {need}, this is onnxruntime {installed}: install "
                            f"onnxruntime>={need}, or re-export the checkpoint with `vl2edge export CHECKPOINT OUT "
                            f"--min-onnxruntime {version_str(parse_version(installed))}`")
