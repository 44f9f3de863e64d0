"""Weight streaming: offloaded training equals resident training bit for bit on every tier."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import GGUF_MODEL, TRAIN_TXT
from engine.data import FormatSpec, build_examples
from engine.errors import EngineError
from engine.eval import perplexity
from engine.model import decoder_blocks, quantize_model
from engine.offload import BlockStreamer, DiskEmbedding, DiskStore, make_store, offload_vocab_tables
from engine.storage import read_safetensors
from engine.quant import OPTQQuantizer, RTNQuantizer
from engine.quant.base import LayerStats
from engine.model import adapter_state, add_lora, lora_parameters
from engine.train import Trainer, TrainSpec


@pytest.fixture(scope="module")
def q4(float_model):
    model = copy.deepcopy(float_model[0])
    quantize_model(model, RTNQuantizer(bits=4, group_size=32))
    return model


@pytest.fixture(scope="module")
def examples(float_model):
    return build_examples(TRAIN_TXT, FormatSpec("text"), float_model[1], 64, limit=24)


class Recorder:
    """Records which blocks are resident at each block's forward (independent of the streamer's bookkeeping)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.blocks = decoder_blocks(model)
        self.max_materialised = 0

    def count(self) -> int:
        return sum(
            not any(b.is_meta for b in block.buffers()) for block in self.blocks
        )

    def attach(self) -> None:
        for block in self.blocks:
            block.register_forward_hook(lambda *_: setattr(self, "max_materialised", max(self.max_materialised, self.count())))


def train(model, examples, out, **config) -> dict[str, torch.Tensor]:
    settings = dict(steps=3, batch_size=2, lr=3e-3, seed=5) | config
    Trainer(model, examples, TrainSpec(**settings), out, 0).train()
    return adapter_state(model)


@pytest.fixture(scope="module")
def resident_runs(q4, examples, tmp_path_factory) -> dict[bool, dict[str, torch.Tensor]]:
    """The adapter after training the resident model, without and with gradient checkpointing."""
    runs = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = copy.deepcopy(q4)
        add_lora(model, 4, 8, seed=0)
        runs[checkpointing] = train(model, examples, tmp_path_factory.mktemp("resident"), grad_checkpointing=checkpointing)
    return runs


@pytest.mark.parametrize("tier", ["device", "host", "disk"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_streamed_training_equals_resident(q4, examples, resident_runs, tmp_path, tier, checkpointing):
    resident = resident_runs[checkpointing]
    torch.manual_seed(0)
    model = copy.deepcopy(q4)
    add_lora(model, 4, 8, seed=0)
    streamer = BlockStreamer(model, make_store(tier, directory=tmp_path / "blocks"), prefetch=1)
    if tier == "disk":  # as modulora finetune --offload disk
        assert offload_vocab_tables(model, tmp_path / "blocks") == ["input embeddings", "output head"]
    recorder = Recorder(model)
    recorder.attach()
    streamed = train(model, examples, tmp_path / "streamed", grad_checkpointing=checkpointing)
    streamer.close()
    assert resident.keys() == streamed.keys()
    assert all(torch.equal(resident[k], streamed[k]) for k in resident)
    n_blocks = len(decoder_blocks(model))
    assert streamer.max_resident <= 2 < n_blocks
    assert 1 <= recorder.max_materialised <= 2
    if tier == "disk":  # every step reads each block once forward and once backward, less the kept turn
        per_step = 2 * n_blocks - 2
        total = sum(streamer.store.nbytes(i) for i in range(n_blocks)) / n_blocks
        assert streamer.store.bytes_fetched == pytest.approx(3 * per_step * total, rel=0.05)


def test_streamed_evaluation_equals_resident(q4, float_model, tmp_path):
    from engine.data import read_text, token_windows
    from conftest import VALID_TXT

    windows = token_windows(float_model[1], read_text(VALID_TXT), 256)[:8]
    expected = perplexity(q4, windows, progress=False).ppl
    model = copy.deepcopy(q4)
    streamer = BlockStreamer(model, make_store("disk", directory=tmp_path / "blocks"), prefetch=2)
    assert perplexity(model, windows, progress=False).ppl == expected
    streamer.materialize()
    streamer.close()
    assert perplexity(model, windows, progress=False).ppl == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_disk_embedding_gives_what_nn_embedding_gives(tmp_path, dtype):
    table = torch.nn.Embedding(300, 24).to(dtype).requires_grad_(False)
    ids = torch.randint(0, 300, (3, 50), generator=torch.Generator().manual_seed(2))
    ids[1, :10] = ids[0, :10]  # repeated tokens
    ids[2, 0], ids[2, 1] = 0, 299  # the first and last rows
    disk = DiskEmbedding.offload(table.weight, tmp_path / "embeddings.safetensors")
    assert torch.equal(disk(ids), table(ids))
    assert torch.equal(load_file(tmp_path / "embeddings.safetensors")["weight"], table.weight)
    with pytest.raises(IndexError, match="300 rows"):
        disk(torch.tensor([[5, 300]]))
    with pytest.raises(EngineError, match="frozen"):
        DiskEmbedding.offload(torch.nn.Embedding(4, 2).weight, tmp_path / "trainable.safetensors")


def test_disk_store_round_trip_and_checksums(tmp_path):
    weight = torch.randn(48, 172, generator=torch.Generator().manual_seed(1))
    stats = LayerStats(torch.eye(172, dtype=torch.float64) * 3, 10)
    quantized = OPTQQuantizer(bits=3, group_size=32, act_order=True).quantize(weight, stats)
    tensors = {f"mlp.{k}": v for k, v in quantized._buffers.items() if v is not None}
    store = DiskStore(tmp_path)
    store.put(0, tensors)
    back = read_safetensors(store.path(0))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert load_file(store.path(0)).keys() == tensors.keys()  # a standard safetensors file
    reopened = DiskStore(tmp_path)
    assert 0 in reopened and reopened.nbytes(0) == store.path(0).stat().st_size
    reopened.verify()
    data = bytearray(store.path(0).read_bytes())
    data[-1] ^= 0xFF
    store.path(0).write_bytes(bytes(data))
    with pytest.raises(EngineError, match="checksum mismatch"):
        reopened.verify()


def test_computing_with_a_block_not_streamed_in_fails_loudly(q4):
    model = copy.deepcopy(q4)
    streamer = BlockStreamer(model, make_store("host"))
    streamer.close()  # hooks gone: nothing brings the blocks in
    with pytest.raises(RuntimeError, match="not resident"):
        model(input_ids=torch.tensor([[1, 2, 3]]))


def test_bad_tier_and_unquantized_model(float_model, tmp_path):
    with pytest.raises(EngineError, match="unknown offload tier 'nvme'; allowed: device, host, disk"):
        make_store("nvme")
    with pytest.raises(EngineError, match="needs a directory"):
        make_store("disk")
    with pytest.raises(EngineError, match="no quantized weights"):
        BlockStreamer(copy.deepcopy(float_model[0]), make_store("host"))


def test_cli_finetune_from_the_disk_tier_equals_resident(q4, tmp_path, capsys):
    from test_cli import modulora_in_process

    args = ["--data", TRAIN_TXT, "--seq-len", "64", "--limit", "16", "--batch-size", "2", "--steps", "2", "--rank", "4",
            "--save-every", "0"]
    code, _, err = modulora_in_process(capsys, "quantize", GGUF_MODEL, "--bits", "4", "--out", tmp_path / "q4")
    assert code == 0, err
    runs = {}
    for name, extra in {"resident": [], "disk": ["--offload", "disk", "--prefetch", "2"]}.items():
        code, _, err = modulora_in_process(capsys, "finetune", tmp_path / "q4", *args, "--out", tmp_path / name, *extra)
        assert code == 0, err
        runs[name] = load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")
    assert runs["resident"].keys() == runs["disk"].keys()
    assert all(torch.equal(runs["resident"][k], runs["disk"][k]) for k in runs["resident"])
    report = json.loads((tmp_path / "disk" / "report.json").read_text())
    assert report["offload"]["tier"] == "disk" and report["offload"]["bytes_fetched"] > 0
    assert report["offload"]["max_blocks_resident"] <= 3


TINY_LLAMA = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=512)


def test_random_packed_model_streams_from_disk_like_resident(tmp_path):
    from engine.offload.shapes import load_config
    from synthetic import build_random_quantized  # bench/synthetic.py

    config = load_config("llama-7b", **TINY_LLAMA)
    tokens = torch.randint(0, 512, (1, 48), generator=torch.Generator().manual_seed(0))
    runs = {}
    for tier in ("device", "disk"):
        store = make_store(tier, directory=tmp_path / "blocks")
        model = build_random_quantized(config, store, bits=3, group_size=64, seed=0)
        add_lora(model, 4, 8.0, seed=1, device="cpu")
        BlockStreamer(model, store, prefetch=1)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        runs[tier] = (loss.detach(), {k: p.grad for k, p in lora_parameters(model).items()})
        assert all(not p.is_meta for p in model.parameters())
    assert torch.equal(runs["device"][0], runs["disk"][0])
    assert all(torch.equal(runs["device"][1][k], runs["disk"][1][k]) for k in runs["device"][1])
    assert 4.0 < float(runs["disk"][0]) < 9.0  # about log(512): random weights of a sane scale


@pytest.mark.slow
def test_shortened_65b_shaped_step_bench(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "llama65b_step.py"
    done = subprocess.run([sys.executable, str(script), "--model", "llama-7b", "--layers", "2", "--seq-len", "16",
                           "--block-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (result,) = json.loads(done.stdout[done.stdout.rindex("\n[\n") :])  # the JSON list printed last
    assert result["layers"] == 2 and result["tier"] == "disk"
    # L blocks, prefetch 1: each read forward and backward, less the 2 kept over the turn (here: each read once)
    assert result["bytes_fetched_gb"] == pytest.approx(result["packed_gb"] * (2 * 2 - 2) / 2, rel=1e-6)
    assert result["peak_rss_gib"] < 2.0 and result["step_s"] > 0
