"""Reading a Hugging Face DeepSeek-VL2 checkpoint: a local directory or a hub repo id.

Lazy: only safetensors headers are read up front (shapes, dtypes, which shard holds which key); a tensor's bytes
are read when it is asked for, from the memory-mapped file. Only safetensors and JSON are ever read: no pickle, no
code from the checkpoint (`trust_remote_code` has no equivalent here). torch is imported only to hand tensors out.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator

from safetensors import SafetensorError, safe_open

from .checkpoint_layout import checkpoint_shapes
from .config import ConfigError, VL2Config

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# What a hub download fetches: weights, configs, tokenizer. Never *.py (remote code) nor pickled *.bin / *.pt.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as DeepSeek-VL2, with the file and key at fault."""


def resolve_checkpoint(ref: str | os.PathLike, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """A local checkpoint directory, or a hub repo id ("deepseek-ai/deepseek-vl2-tiny") downloaded or found in the
    local Hugging Face cache through huggingface_hub."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a checkpoint directory (config.json + *.safetensors)")
    ref = str(ref)
    if not _REPO_ID.match(ref):
        raise CheckpointError(f"{ref}: no such directory, and not a hub repo id of the form 'owner/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(ref, revision=revision, cache_dir=cache_dir, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError as e:
        raise CheckpointError(f"{ref}: not a local directory, and the hub could not be reached and the local "
                              f"cache has no copy ({e})") from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"{ref}: hub download failed: {e}") from None


class Checkpoint:
    """An opened checkpoint: config, processor config, and lazy access to its tensors."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        try:
            self.config = VL2Config.from_file(self.dir / "config.json")
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        self._headers: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
        self._handles: dict[str, object] = {}
        self.weight_map = self._weight_map()

    @classmethod
    def open(cls, ref: str | os.PathLike, revision: str | None = None, cache_dir: str | None = None,
             validate: bool = True) -> "Checkpoint":
        ckpt = cls(resolve_checkpoint(ref, revision, cache_dir))
        if validate:
            ckpt.validate()
        return ckpt

    # --- files ------------------------------------------------------------------------------------------------
    def _weight_map(self) -> dict[str, str]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: malformed index ({e!r})") from None
            for shard in sorted(set(wm.values())):
                if not (self.dir / shard).is_file():
                    raise CheckpointError(f"{index} names shard {shard!r}, which is missing from {self.dir}")
            return dict(wm)
        single = self.dir / SINGLE_FILE
        files = [single] if single.is_file() else sorted(self.dir.glob("*.safetensors"))
        if not files:
            pickled = sorted(p.name for p in self.dir.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            hint = f" (found {pickled}: pickled weights are never loaded; convert them to safetensors)" if pickled else ""
            raise CheckpointError(f"{self.dir}: no *.safetensors weights{hint}")
        if len(files) > 1:
            raise CheckpointError(f"{self.dir}: {len(files)} safetensors files but no {INDEX_FILE}")
        return {k: files[0].name for k in self._header(files[0].name)}

    def _header(self, shard: str) -> dict[str, tuple[tuple[int, ...], str]]:
        if shard not in self._headers:
            path = self.dir / shard
            try:
                with safe_open(str(path), framework="numpy") as f:
                    self._headers[shard] = {
                        k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()
                    }
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        return self._headers[shard]

    @property
    def processor_config(self) -> dict:
        path = self.dir / "processor_config.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{self.dir}: no processor_config.json") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None

    # --- tensors ----------------------------------------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        return self._header(self._shard_of(name))[name][0]

    def _shard_of(self, name: str) -> str:
        try:
            return self.weight_map[name]
        except KeyError:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is not in the checkpoint") from None

    def validate(self) -> None:
        """Every expected key present with its expected shape; no unexpected keys; every shard header readable."""
        expected = checkpoint_shapes(self.config)
        missing = [k for k in expected if k not in self.weight_map]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"{self.dir}: missing tensor {missing[0]!r}, expected shape "
                                  f"{list(expected[missing[0]])}{more}")
        unexpected = sorted(set(self.weight_map) - set(expected))
        if unexpected:
            raise CheckpointError(f"{self.dir}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all) for "
                                  f"this config — is config.json the checkpoint's own?")
        for name, shape in expected.items():
            shard = self._shard_of(name)
            entry = self._header(shard).get(name)
            if entry is None:
                raise CheckpointError(f"{self.dir / shard}: index says it holds {name!r}, but it does not")
            if entry[0] != shape:
                raise CheckpointError(f"{self.dir / shard}: tensor {name!r} has shape {list(entry[0])}, "
                                      f"expected {list(shape)}")

    def tensor(self, name: str, dtype=None):
        """One tensor as a torch.Tensor (read on demand from the memory-mapped shard)."""
        shard = self._shard_of(name)
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.dir / shard), framework="pt")
        t = self._handles[shard].get_tensor(name)
        return t if dtype is None else t.to(dtype)

    def close(self) -> None:
        """Drop the open shard handles, unmapping the pages read so far (streaming readers call this between
        layers so the resident set does not grow with the checkpoint)."""
        self._handles.clear()

    def tensors(self, prefix: str = "", dtype=None) -> Iterator[tuple[str, object]]:
        for name in self.weight_map:
            if name.startswith(prefix):
                yield name, self.tensor(name, dtype)
