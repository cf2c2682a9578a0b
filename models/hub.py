"""Models from the Hugging Face Hub: ``--model ORG/NAME`` (``@REVISION`` or ``--revision``).

Two stages, because a node picks its blocks only once it has read the config:

1. ``resolve_hub`` downloads what every role reads first (config, generation config,
   tokenizer files, the safetensors index) and pins the revision to its commit sha. The
   model's folder is that commit's snapshot in the standard Hugging Face cache (``HF_HOME``),
   which every process of the machine shares.
2. ``fetch_blocks`` and ``fetch_head`` download only the safetensors files that hold a
   node's blocks, or the gateway's embedding, norms and LM head (``weight_map`` of the
   index), once the cache's disk is known to hold them.

Everything goes through ``huggingface_hub`` (``snapshot_download``): its progress bars,
``HF_TOKEN`` for gated models, ``HF_HUB_OFFLINE=1`` to use the cache only. Its errors become
one-line ``ModelSourceError`` messages naming the model and revision.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from models.families import Family

logger = logging.getLogger("swarmgate.hub")


class ModelSourceError(Exception):
    """A model that cannot be had (refused, unknown, not cached offline, no room): its
    message is one line naming the model, for ``swarmgate <role>: ...``."""


class Pinned(Protocol):
    """A model folder as resolved (``models.resolve.ModelSource``): for a Hub model, its repo
    and the commit its folder holds; None for local models."""

    @property
    def path(self) -> Path: ...

    @property
    def repo_id(self) -> str | None: ...

    @property
    def revision(self) -> str | None: ...


INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"  # the weights of a repo without an index
# What every role reads before it knows its part of the weights.
META_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer*",  # tokenizer.json, tokenizer_config.json, tokenizer.model
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates/*",
    INDEX,
]


def parse_hub_id(spec: str, revision: str | None = None) -> tuple[str, str | None] | None:
    """``(repo id, revision)`` when ``spec`` reads as a Hub id ``ORG/NAME[@REVISION]``, else
    None. A revision in ``spec`` and another in ``revision`` is an error."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils._validators import validate_repo_id

    repo_id, at, pinned = spec.partition("@")
    if repo_id.count("/") != 1 or repo_id.endswith(".gguf"):
        return None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    if at and not pinned:
        raise ModelSourceError(f"--model {spec!r}: nothing after '@' (ORG/NAME@REVISION)")
    if pinned and revision and pinned != revision:
        raise ModelSourceError(
            f"--model {spec!r} names revision {pinned!r} but --revision says {revision!r}"
        )
    return repo_id, pinned or revision or None


def resolve_hub(repo_id: str, revision: str | None) -> tuple[Path, str]:
    """Download the config, tokenizer and index of ``repo_id`` at ``revision`` (default: the
    main branch) and pin the revision to its commit: the commit's folder and its sha."""
    wanted = revision or "main"
    with _hub_errors(repo_id, wanted):
        folder = Path(_snapshot(repo_id, wanted, META_PATTERNS))
    sha = folder.name  # the snapshot of a commit is named by its sha
    label = f"{repo_id} (revision {sha})"
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"{label} has no config.json: not a transformers model")
    listed = _listed_sizes(repo_id, sha)
    if not (folder / INDEX).is_file() and listed is not None and SINGLE not in listed:
        raise ModelSourceError(
            f"{label} has no safetensors weights ({SINGLE} or {INDEX}); "
            "swarmgate reads safetensors only"
        )
    logger.info("model %s at revision %s (commit %s) in %s", repo_id, wanted, sha, folder)
    return folder, sha


def fetch_blocks(source: Pinned, start: int, end: int) -> None:
    """Download the safetensors files holding blocks ``[start, end)``."""
    fetch_files(source, block_files(source.path, start, end), f"blocks {start}:{end}")


def fetch_head(source: Pinned) -> None:
    """Download the safetensors files holding the embedding, its norm if any, the final
    norm and the LM head (the embedding, when tied)."""
    fetch_files(source, head_files(source.path), "the embedding, final norm and LM head")


def block_files(folder: Path, start: int, end: int) -> list[str]:
    """The weight files (relative to ``folder``) holding blocks ``[start, end)``."""
    family, config, weight_map = _layout(folder)
    blocks = int(config.num_hidden_layers)
    if not 0 <= start < end <= blocks:
        raise ModelSourceError(f"blocks {start}:{end} outside the model's 0:{blocks}")
    if weight_map is None:
        return [SINGLE]
    files: set[str] = set()
    for block in range(start, end):
        files |= _files_of(weight_map, family.base, f"{family.layers}.{block}")
    return sorted(files)


def head_files(folder: Path) -> list[str]:
    """The weight files (relative to ``folder``) holding the gateway's part of the model."""
    family, _, weight_map = _layout(folder)
    if weight_map is None:
        return [SINGLE]
    parts = [family.embed, family.norm, *([family.embed_norm] if family.embed_norm else [])]
    files: set[str] = set()
    for part in parts:
        files |= _files_of(weight_map, family.base, part)
    # Absent: tied to the embedding, which the checkpoint stores once.
    files |= {file for name, file in weight_map.items() if name.startswith("lm_head.")}
    return sorted(files)


def _layout(folder: Path) -> tuple[Family, PretrainedConfig, dict[str, str] | None]:
    from transformers import AutoConfig

    from models.families import family_of

    try:
        config = AutoConfig.from_pretrained(folder)
        family = family_of(config)
    except ValueError as e:
        raise ModelSourceError(str(e)) from None
    index = folder / INDEX
    weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    return family, config, weight_map


def _files_of(weight_map: dict[str, str], base: str, path: str) -> set[str]:
    """Files holding ``path`` under the decoder, as ``models.loading._read_part`` reads it:
    ``{base}.{path}.*``, or ``{path}.*`` in checkpoints saved from the bare decoder."""
    for prefix in (f"{base}.{path}.", f"{path}."):
        files = {file for name, file in weight_map.items() if name.startswith(prefix)}
        if files:
            return files
    raise ModelSourceError(f"{INDEX} names no weights for {base}.{path}")


def fetch_files(source: Pinned, files: list[str], what: str) -> None:
    """Download those of ``files`` not yet in ``source``'s snapshot, after checking the
    cache's disk holds them. A no-op for local models."""
    if source.repo_id is None or source.revision is None:
        return
    missing = [f for f in files if not (source.path / f).is_file()]
    if not missing:
        logger.info("%s of %s: %d files, all in the cache", what, _label(source), len(files))
        return
    from huggingface_hub import constants

    sizes = _listed_sizes(source.repo_id, source.revision)
    needed = sum(sizes.get(f, 0) for f in missing) if sizes is not None else None
    if needed is not None:
        check_disk(Path(constants.HF_HUB_CACHE), needed, f"{what} of {_label(source)}")
    logger.info(
        "downloading %s of %s: %d files, %s: %s",
        what,
        _label(source),
        len(missing),
        f"{needed} bytes ({_size(needed)})" if needed is not None else "size unknown",
        ", ".join(missing),
    )
    with _hub_errors(source.repo_id, source.revision):
        _snapshot(source.repo_id, source.revision, missing)
    absent = [f for f in missing if not (source.path / f).is_file()]
    if absent:
        raise ModelSourceError(f"{_not_cached(_label(source))} (missing: {absent[0]})")


def check_disk(cache: Path, needed: int, what: str) -> None:
    """Refuse before downloading ``needed`` bytes into ``cache`` if its disk lacks room."""
    existing = cache
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise ModelSourceError(
            f"not enough disk for {what}: it needs {needed} bytes ({_size(needed)}) in the "
            f"Hugging Face cache {cache}, which has {free} bytes ({_size(free)}) free "
            "(set HF_HOME to a larger disk)"
        )


def _snapshot(repo_id: str, revision: str, patterns: list[str]) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, revision=revision, allow_patterns=patterns)


def _listed_sizes(repo_id: str, sha: str) -> dict[str, int] | None:
    """The commit's files and their sizes, from the tree listing that ``snapshot_download``
    keeps in the cache (None: not cached, as after an offline resolve)."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        return {f.path: int(f.size) for f in get_cached_repo_tree(repo_id, revision=sha)}
    except CachedRepoTreeNotFoundError:
        return None


def _label(source: Pinned) -> str:
    return f"{source.repo_id} (revision {source.revision})"


def _not_cached(label: str) -> str:
    from huggingface_hub import constants

    cache = constants.HF_HUB_CACHE
    if constants.is_offline_mode():
        return (
            f"{label} is not in the Hugging Face cache {cache} and offline mode is on "
            "(HF_HUB_OFFLINE=1): download it once with network access"
        )
    return (
        f"{label} is not in the Hugging Face cache {cache} and the Hugging Face Hub "
        f"({constants.ENDPOINT}) cannot be reached"
    )


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str) -> Iterator[None]:
    """Turn huggingface_hub's errors into one line naming the model and what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    label = f"{repo_id} (revision {revision})"
    try:
        yield
    except GatedRepoError as e:
        status = _status(e)
        if status == 403:
            hint = (
                "the token in HF_TOKEN has no access: ask for it on the model's page, or set "
                "HF_TOKEN to the token of an account that has it"
            )
        else:
            hint = "set HF_TOKEN to the token of an account granted access to it"
        raise ModelSourceError(
            f"{label} is gated and the Hugging Face Hub refused access (HTTP {status}): {hint}"
        ) from None
    except RepositoryNotFoundError as e:
        if _status(e) == 401:
            raise ModelSourceError(
                f"{label}: no such model on the Hugging Face Hub, or it is private "
                "(HTTP 401): check the name, or set HF_TOKEN to a token that can read it"
            ) from None
        raise ModelSourceError(
            f"{label}: no such model on the Hugging Face Hub ({constants.ENDPOINT})"
        ) from None
    except RevisionNotFoundError:
        raise ModelSourceError(
            f"{repo_id} has no revision {revision!r} on the Hugging Face Hub"
        ) from None
    except RemoteEntryNotFoundError as e:
        url = str(e.response.url) if e.response is not None else "?"
        raise ModelSourceError(
            f"{label}: a file is missing on the Hugging Face Hub ({url})"
        ) from None
    except LocalEntryNotFoundError:  # offline, or the Hub unreachable, and not in the cache
        raise ModelSourceError(_not_cached(label)) from None
    except HfHubHTTPError as e:
        raise ModelSourceError(
            f"{label}: the Hugging Face Hub answered HTTP {_status(e)}"
        ) from None


def _status(error: Any) -> int | None:
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    return int(status) if status is not None else None


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
