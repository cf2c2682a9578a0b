"""Hub ids through huggingface_hub against a fake Hub on loopback (tests/fake_hub.py): what
each role downloads, revisions, gated repos, offline mode and the disk check."""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from transformers import AutoTokenizer, BloomConfig, LlamaConfig

from models.hub import block_files, head_files
from models.loading import load_head, load_span
from models.resolve import ModelSource, ModelSourceError, resolve_model
from tests.fake_hub import (
    TINY_META,
    FakeHub,
    folder_files,
    shard_name,
    shard_per_block,
    use_hub,
)

SHARDS = 6  # embedding, 4 blocks, norm + LM head
META = set(TINY_META)
TOKEN = "hf_granted"


def shard(index: int) -> str:
    return shard_name(index, SHARDS)


@pytest.fixture(scope="module")
def sharded(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shard_per_block(tiny_model, tmp_path_factory.mktemp("sharded"))


@pytest.fixture(scope="module")
def hub(sharded: Path, tiny_model: Path) -> Iterator[FakeHub]:
    files = folder_files(sharded)
    # What a Hub repo holds beside: never needed, never downloaded.
    files |= {"README.md": b"# tiny", "original/consolidated.00.pth": b"\0" * 4096}
    repos = {
        "org/tiny": {"main": files, "v2": files | {"README.md": b"# tiny, v2"}},
        "org/gated": {"main": files},
        "org/single": {"main": folder_files(tiny_model)},  # one model.safetensors, no index
    }
    with FakeHub(repos, gated={"org/gated": TOKEN}) as running:
        yield running


class Client(NamedTuple):
    name: str
    home: Path


@pytest.fixture
def client(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, request: pytest.FixtureRequest
) -> Client:
    """This process on the fake Hub with a cache of its own, its requests recorded under
    the test's name."""
    name = request.node.name
    use_hub(monkeypatch, hub.endpoint(name), tmp_path / "hf")
    return Client(name, tmp_path / "hf")


def switch(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch, home: Path, name: str, **how: object
) -> str:
    """Another process on the same cache (``offline``, ``token``): its client name."""
    use_hub(monkeypatch, hub.endpoint(name), home, **how)  # type: ignore[arg-type]
    return name


def test_a_node_downloads_config_tokenizer_index_and_only_its_blocks_shards(
    hub: FakeHub, client: Client, tiny_model: Path
) -> None:
    source = resolve_model("org/tiny")
    sha = hub.sha("org/tiny")
    assert source == ModelSource(
        "org/tiny",
        client.home / "hub" / "models--org--tiny" / "snapshots" / sha,
        repo_id="org/tiny",
        revision=sha,
    )
    assert hub.downloads(client.name) == META
    source.fetch_blocks(2, 4)
    assert hub.downloads(client.name) == META | {shard(4), shard(5)}  # blocks 2 and 3

    served, whole = load_span(source.path, 2, 4), load_span(tiny_model, 2, 4)
    for ours, theirs in zip(served.layers, whole.layers, strict=True):
        for (name, a), (_, b) in zip(
            ours.state_dict().items(), theirs.state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), name


def test_the_head_downloads_only_the_embedding_norm_and_lm_head_shards(
    hub: FakeHub, client: Client, tiny_model: Path
) -> None:
    source = resolve_model("org/tiny", name="tiny")
    source.fetch_head()
    assert source.name == "tiny"
    assert hub.downloads(client.name) == META | {shard(1), shard(6)}
    ours, theirs = load_head(source.path), load_head(tiny_model)
    assert torch.equal(ours.embed.weight, theirs.embed.weight)
    assert torch.equal(ours.lm_head.weight, theirs.lm_head.weight)
    assert torch.equal(ours.norm.weight, theirs.norm.weight)
    text = "Hello, swarm!"
    assert AutoTokenizer.from_pretrained(source.path).encode(text) == (
        AutoTokenizer.from_pretrained(tiny_model).encode(text)
    )


def test_a_whole_model_downloads_every_shard_for_a_benchmarks_generate(
    hub: FakeHub, client: Client
) -> None:
    source = resolve_model("org/tiny")
    source.fetch_whole()
    assert hub.downloads(client.name) == META | {shard(i) for i in range(1, SHARDS + 1)}


def test_the_cache_serves_other_processes_and_offline_mode(
    hub: FakeHub, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolve_model("org/tiny").fetch_blocks(2, 4)

    again = switch(hub, monkeypatch, client.home, "again")
    resolve_model("org/tiny").fetch_blocks(2, 4)
    assert hub.downloads(again) == set()  # all from the shared cache

    offline = switch(hub, monkeypatch, client.home, "offline", offline=True)
    source = resolve_model("org/tiny")
    source.fetch_blocks(2, 4)
    assert source.revision == hub.sha("org/tiny")
    assert (source.path / shard(5)).is_file()
    with pytest.raises(ModelSourceError) as never_fetched:
        source.fetch_blocks(0, 2)
    with pytest.raises(ModelSourceError) as never_resolved:
        resolve_model("org/other")
    assert hub.requests(offline) == []
    for error, model in ((never_fetched, "org/tiny"), (never_resolved, "org/other")):
        message = str(error.value)
        assert model in message and "not in the Hugging Face cache" in message, message
        assert "HF_HUB_OFFLINE=1" in message and "\n" not in message, message


def test_a_revision_pins_its_commit_and_a_missing_one_is_named(
    hub: FakeHub, client: Client
) -> None:
    main, v2 = hub.sha("org/tiny"), hub.sha("org/tiny", "v2")
    assert main != v2
    assert resolve_model("org/tiny@v2").revision == v2
    assert resolve_model("org/tiny", revision="v2").revision == v2
    assert resolve_model("org/tiny", revision=main).revision == main
    assert resolve_model(f"org/tiny@{v2}").path.name == v2

    with pytest.raises(ModelSourceError, match="names revision 'v2' but --revision says 'main'"):
        resolve_model("org/tiny@v2", revision="main")
    with pytest.raises(ModelSourceError) as missing:
        resolve_model("org/tiny@v9")
    assert str(missing.value) == "org/tiny has no revision 'v9' on the Hugging Face Hub"


def test_a_gated_model_needs_its_token_and_says_so(
    hub: FakeHub, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ModelSourceError) as no_token:
        resolve_model("org/gated")
    message = str(no_token.value)
    assert message.startswith("org/gated (revision main) is gated"), message
    assert "HTTP 401" in message and "set HF_TOKEN" in message, message

    switch(hub, monkeypatch, client.home, "wrong-token", token="hf_other")
    with pytest.raises(ModelSourceError) as wrong_token:
        resolve_model("org/gated")
    assert "HTTP 403" in str(wrong_token.value) and "HF_TOKEN" in str(wrong_token.value)

    granted = switch(hub, monkeypatch, client.home, "granted", token=TOKEN)
    source = resolve_model("org/gated")
    source.fetch_blocks(0, 1)
    assert hub.downloads(granted) == META | {shard(2)}


def test_an_unknown_model_is_named(hub: FakeHub, client: Client) -> None:
    with pytest.raises(ModelSourceError) as unknown:
        resolve_model("org/missing")
    assert str(unknown.value).startswith(
        "org/missing (revision main): no such model on the Hugging Face Hub"
    )


def test_the_disk_check_refuses_before_downloading(
    hub: FakeHub, client: Client, sharded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = resolve_model("org/tiny")
    checked: list[Path] = []

    def almost_full(path: str | Path) -> shutil._ntuple_diskusage:
        checked.append(Path(path))
        return shutil._ntuple_diskusage(total=10**12, used=10**12 - 1000, free=1000)

    monkeypatch.setattr(shutil, "disk_usage", almost_full)
    with pytest.raises(ModelSourceError) as refused:
        source.fetch_blocks(0, 4)
    needed = sum((sharded / shard(i)).stat().st_size for i in range(2, 6))
    message = str(refused.value)
    assert f"it needs {needed} bytes" in message, message
    assert "which has 1000 bytes (1000 B) free" in message and "blocks 0:4" in message, message
    assert "org/tiny" in message and "\n" not in message
    assert checked == [client.home / "hub"]  # the Hugging Face cache's disk
    assert hub.downloads(client.name) == META  # no shard


def test_a_repo_without_an_index_downloads_its_one_file(hub: FakeHub, client: Client) -> None:
    source = resolve_model("org/single")
    source.fetch_blocks(1, 3)
    source.fetch_head()
    assert hub.downloads(client.name) == (META - {"model.safetensors.index.json"}) | {
        "model.safetensors"
    }
    assert len(load_span(source.path, 1, 3).layers) == 2


def test_local_paths_win_and_other_specs_keep_their_error(
    hub: FakeHub, client: Client, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    shutil.copytree(tiny_model, tmp_path / "org" / "tiny")
    monkeypatch.chdir(tmp_path)
    source = resolve_model("org/tiny", revision="v2")  # a local model: the revision is ignored
    source.fetch_blocks(0, 4)
    source.fetch_head()
    assert source == ModelSource("tiny", Path("org/tiny"))
    assert source.model_flags() == ["--model", "org/tiny"]
    for spec in ("no-such-folder", "a/b/c", "org/model.gguf", "./org/none"):
        with pytest.raises(FileNotFoundError, match=r"\.gguf file or a Hugging Face Hub id"):
            resolve_model(spec)
    assert hub.requests(client.name) == []


def test_up_gives_its_children_the_commit_it_resolved(hub: FakeHub, client: Client) -> None:
    from swarmgate.cli import build_parser
    from swarmgate.local_swarm import LocalSwarm

    source = resolve_model("org/tiny")
    args: argparse.Namespace = build_parser().parse_args(["up", "--model", "org/tiny"])
    flags = LocalSwarm(source, args)._common(["/ip4/127.0.0.1/tcp/1"])
    model = ["--model", "org/tiny", "--revision", hub.sha("org/tiny"), "--model-name", "org/tiny"]
    assert flags[: len(model)] == model


def test_weight_files_follow_each_layout(tmp_path: Path) -> None:
    """Block i is ``{base}.{layers}.{i}.*`` or, in checkpoints of the bare decoder (BLOOM),
    ``{layers}.{i}.*``; a tied LM head adds no file."""
    llama = tmp_path / "llama"
    LlamaConfig(num_hidden_layers=12, tie_word_embeddings=True).save_pretrained(llama)
    llama_map = {f"model.layers.{i}.mlp.up_proj.weight": f"b{i}" for i in range(12)}
    llama_map |= {"model.embed_tokens.weight": "e", "model.norm.weight": "n"}
    bloom = tmp_path / "bloom"
    BloomConfig(n_layer=12).save_pretrained(bloom)
    bloom_map = {f"h.{i}.mlp.dense_4h_to_h.weight": f"b{i}" for i in range(12)}
    bloom_map |= {
        "word_embeddings.weight": "e",
        "word_embeddings_layernorm.weight": "en",
        "ln_f.weight": "n",
        "lm_head.weight": "h",
    }
    for folder, weight_map in ((llama, llama_map), (bloom, bloom_map)):
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    assert block_files(llama, 1, 2) == ["b1"]  # not blocks 10 and 11
    assert block_files(llama, 9, 12) == ["b10", "b11", "b9"]
    assert head_files(llama) == ["e", "n"]
    assert block_files(bloom, 0, 2) == ["b0", "b1"]
    assert head_files(bloom) == ["e", "en", "h", "n"]
    with pytest.raises(ModelSourceError, match="outside the model's 0:12"):
        block_files(bloom, 11, 13)
