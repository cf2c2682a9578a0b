"""The ``draft`` drafter (``--speculate draft``): a small causal LM on the gateway, sharing
the served model's tokenizer, guesses each stream's next tokens greedily.

One ``DraftModel`` per gateway holds the weights; each stream has a ``DraftModelDrafter``
with a KV cache of its own. A drafter is told every token its stream holds (lazily: nothing
runs until it is asked), and a proposal feeds what it has not seen yet in one forward, then
drafts one token per forward. Its cache then holds its own guesses; the next proposal keeps
only the longest prefix of what it fed that the stream really holds (``DynamicCache.crop``)
and feeds the rest, so a guess not taken costs no recomputation of the conversation.

Every call comes from the head's thread, one at a time (gateway/engine/head.py): the model
and the caches need no lock. Drafts are argmax tokens, deterministic, so verification keeps
the output exact (gateway/engine/drafting.py), whatever the draft model is.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache

from models.devices import CPU, dtype_name
from models.families import family_of
from models.loading import load_config, load_tokenizer
from models.quantization import QUANTS, quantize_blocks
from models.resolve import resolve_model
from protocol.prefix import common_prefix

logger = logging.getLogger("swarmgate.gateway")


class DraftModel:
    """A whole causal LM that drafts for every stream of a gateway."""

    def __init__(
        self, model: torch.nn.Module, *, vocab: int, max_positions: int, name: str = "draft"
    ) -> None:
        self.model = model
        # Drafts are ids the served model embeds: the draft's logits past the tokenizer's
        # vocabulary (padding rows of its LM head) are never proposed.
        self.vocab = vocab
        self.max_positions = max_positions
        self.name = name

    @classmethod
    def load(
        cls,
        spec: str,
        served: PreTrainedTokenizerBase,
        *,
        device: torch.device = CPU,
        dtype: torch.dtype = torch.float32,
        layers: int | None = None,
        quantization: str = "none",
    ) -> DraftModel:
        """The model ``spec`` names (``smollm2``, a folder, a Hub id), refused (ValueError)
        unless its tokenizer is ``served``'s. ``layers``: keep its first N blocks only;
        ``quantization``: its blocks through bitsandbytes ("int8", "nf4")."""
        if quantization not in QUANTS:
            raise ValueError(f"draft quantization {quantization!r}: expected one of {QUANTS}")
        source = resolve_model(spec)
        source.fetch_whole()
        check_vocabulary(load_tokenizer(source.path), served, spec)
        config = load_config(source.path)
        blocks = int(config.num_hidden_layers)
        if layers is not None:
            truncate(config, layers)
        model = _pretrained(source.path, config, dtype, cut=config.num_hidden_layers < blocks)
        model.eval()
        if quantization != "none":
            # Weights are on the host here, as bitsandbytes quantizes while moving them.
            stack = model.get_submodule(family_of(config).blocks_path)
            quantize_blocks(list(stack), quantization, dtype, device=device)
        model.to(device)
        draft = cls(
            model,
            vocab=len(served),
            max_positions=int(config.max_position_embeddings),
            name=source.name,
        )
        logger.info(
            "draft model %s: %d of %d blocks, %s, %s%s",
            source.name,
            int(config.num_hidden_layers),
            blocks,
            device,
            dtype_name(dtype),
            f", {quantization}" if quantization != "none" else "",
        )
        return draft

    def drafter(self) -> DraftModelDrafter:
        """A new stream's drafter."""
        return DraftModelDrafter(self)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def next_token(self, ids: Sequence[int], cache: DynamicCache) -> int:
        """Feed ``ids`` after what ``cache`` holds; the greedy token after the last one."""
        inputs = torch.tensor([list(ids)], device=self.device)
        with torch.inference_mode():
            out = self.model(
                input_ids=inputs, past_key_values=cache, use_cache=True, logits_to_keep=1
            )
        return int(out.logits[0, -1, : self.vocab].argmax())


def _pretrained(folder: Path, config: PretrainedConfig, dtype: torch.dtype, *, cut: bool) -> Any:
    """The causal LM of ``folder`` as ``config`` builds it; refused (ValueError) where the
    checkpoint lacks weights it needs, which would draft from random ones. ``cut``: blocks
    were cut off, whose weights are in the checkpoint but not in the model: transformers'
    load report would list each as unexpected, and says nothing else that is checked here."""
    report = logging.getLogger("transformers.modeling_utils")
    level = report.level
    if cut:
        report.setLevel(logging.ERROR)
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            folder, config=config, dtype=dtype, output_loading_info=True
        )
    finally:
        report.setLevel(level)
    model, info = loaded
    wrong = [str(key) for key in [*info["missing_keys"], *info["mismatched_keys"]]]
    if wrong:
        raise ValueError(
            f"draft model {folder}: {len(wrong)} weights missing or of another shape "
            f"(e.g. {wrong[:3]})"
        )
    return model


def check_vocabulary(
    draft: PreTrainedTokenizerBase, served: PreTrainedTokenizerBase, spec: str
) -> None:
    """Refuse a draft model whose tokens are not the served model's, id for id: its drafts
    would be other tokens than it meant, and almost never accepted."""
    why = (
        "a draft model must share the served model's tokenizer (e.g. a smaller model of "
        "the same family)"
    )
    if len(draft) != len(served):
        raise ValueError(
            f"--draft-model {spec}: its vocabulary has {len(draft)} tokens, the served "
            f"model's {len(served)}: {why}"
        )
    theirs = draft.get_vocab()
    differ = [token for token, id_ in served.get_vocab().items() if theirs.get(token) != id_]
    if differ:
        raise ValueError(
            f"--draft-model {spec}: {len(differ)} tokens have other ids than in the served "
            f"model's vocabulary (e.g. {differ[:3]!r}): {why}"
        )


def truncate(config: PretrainedConfig, layers: int) -> None:
    """Keep the first ``layers`` blocks (fewer blocks: faster drafts, fewer right)."""
    if layers < 1:
        raise ValueError(f"draft layers {layers}: at least 1")
    if layers >= config.num_hidden_layers:
        return
    config.num_hidden_layers = layers
    kinds = getattr(config, "layer_types", None)
    if isinstance(kinds, list):  # one per block (sliding or full attention)
        config.layer_types = kinds[:layers]


class DraftModelDrafter:
    """One stream's drafts from a ``DraftModel``, with its own KV cache."""

    costly = True  # a forward of the draft model per guess, on the head thread

    def __init__(self, model: DraftModel) -> None:
        self._model = model
        self._tokens: list[int] = []  # what the stream holds, as told
        self._fed: list[int] = []  # what the cache holds, in order: told tokens, then guesses
        # Without a config every layer keeps every position: crop can then always go back
        # (a sliding-window layer forgets what a rollback would need).
        self._cache = DynamicCache()

    def extend(self, tokens: Sequence[int]) -> None:
        self._tokens.extend(tokens)

    def prepare(self) -> None:
        """Read what the stream holds (its prompt) into the cache now: the first proposal
        then feeds only the token chosen after it."""
        if not self._tokens:
            return
        self._rewind()
        unread = self._tokens[len(self._fed) :]
        if unread and len(self._tokens) < self._model.max_positions:
            self._model.next_token(unread, self._cache)
            self._fed = list(self._tokens)

    def propose(self, limit: int) -> list[int]:
        # The cache ends up holding the stream's tokens and all drafts but the last: within
        # the draft model's positions.
        limit = min(limit, self._model.max_positions - len(self._tokens))
        if limit <= 0 or not self._tokens:
            return []
        self._rewind()
        drafts = [self._model.next_token(self._tokens[len(self._fed) :], self._cache)]
        self._fed = list(self._tokens)
        while len(drafts) < limit:
            drafts.append(self._model.next_token(drafts[-1:], self._cache))
            self._fed.append(drafts[-2])
        return drafts

    def _rewind(self) -> None:
        """Drop from the cache what the stream does not hold (guesses not taken), and keep
        at least one token to feed: its logits are the first draft's."""
        kept = min(common_prefix(self._fed, self._tokens), len(self._tokens) - 1)
        dropped = len(self._fed) - kept
        if dropped > 0:
            self._cache.crop(-dropped)  # transformers 5: a negative count removes as many
            del self._fed[kept:]
