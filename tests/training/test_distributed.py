"""The same train command under torchrun: 2 processes on CPU (gloo), checkpoints from rank 0 only,
language pretraining on rank 0 only, resumed across the switch to self-critical training."""

import json
import subprocess
import sys

import pytest

from captioner.data.prepare import PreparedDataset

pytestmark = pytest.mark.usefixtures("one_thread_per_process")  # several processes share the cores here


def torchrun(*args, timeout=600):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "captioner", "train", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_processes_on_cpu_train_and_resume(shapes_prepared, tmp_path):
    out = tmp_path / "run"
    settings = [
        "--data", str(shapes_prepared), "--out", str(out), "--batch-size", "8", "--quiet",
        "--set", "decoder.hidden_dim=128", "--set", "decoder.embed_dim=64", "--set", "decoder.attention_dim=64",
        "--set", "decoder_lr=3e-3", "--set", "val_beam_size=1", "--set", "workers=0", "--set", "seq_per_img=3",
        "--set", "self_critical_start=2", "--set", "self_critical_lr=5e-4",  # epochs 3-4: self-critical, under DDP too
    ]
    # the new run first learns the language from text (rank 0 alone; every checkpoint checks both ranks hold the same weights)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(c for captions in PreparedDataset(shapes_prepared).references("train").values() for c in captions[:1]) + "\n")
    result = torchrun(*settings, "--epochs", "2", "--set", f"language_text={text}", "--set", "language_batch_size=64")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes" in result.stdout and result.stdout.count("language epoch 1/1") == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]  # written once, by rank 0
    state = json.loads((out / "last" / "training_state.json").read_text())
    assert len(state["__dict__"][-1][1]) == 2  # the random state of both ranks
    result = torchrun(*settings, "--epochs", "4", "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert ["train_reward" in r for r in records] == [False, False, True, True]
    assert records[-1]["val_CIDEr-D"] > records[0]["val_CIDEr-D"]


@pytest.mark.slow
def test_two_processes_fine_tune_the_encoder_in_step(shapes_prepared, tmp_path):
    # Fine-tuning switches on in epoch 2: DDP must synchronise the encoder's gradients from then on
    # (every checkpoint checks that both ranks hold the same weights), and epoch 1 trains from the cache.
    # The decoder has hard attention: each rank draws its own readings, the reward baseline is pooled.
    from safetensors.torch import load_file

    out = tmp_path / "run"
    result = torchrun(
        "--data", str(shapes_prepared), "--out", str(out), "--batch-size", "32", "--quiet", "--epochs", "2",
        "--set", "decoder.hidden_dim=64", "--set", "decoder.embed_dim=32", "--set", "decoder.attention_dim=32",
        "--set", "val_beam_size=1", "--set", "workers=0", "--set", "seq_per_img=2", "--set", "val_max_images=8",
        "--set", "fine_tune_encoder=1", "--set", "fine_tune_from_epoch=1", "--set", "patience=0", "--set", "decoder.attention=hard",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    epoch_one = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert epoch_one["train_captions_per_second"] > 0
    tensors = load_file(str(out / "last" / "model.safetensors"))
    assert any(name.startswith("encoder.") for name in tensors)  # the fine-tuned encoder is saved
    assert json.loads((out / "best" / "config.json").read_text())["decoder"]["attention"] == "hard"
