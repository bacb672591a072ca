"""``dms-perf train`` end to end on a tiny plain-Qwen3 checkpoint, and its one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from dms_perf.bench.cli import main
from dms_perf.bench.workloads import FILLER
from dms_perf.model.qwen3_dms import load_model
from tests.bench.word_tokenizer import word_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A plain Qwen3 checkpoint (no dms_* fields) with a word-level tokenizer."""
    path = tmp_path_factory.mktemp("qwen3")
    tokenizer = word_tokenizer()
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A directory of two .txt files (and a file that is not .txt, which is not read)."""
    path = tmp_path_factory.mktemp("corpus")
    (path / "a.txt").write_text("\n".join(FILLER * 3))
    (path / "sub").mkdir()
    (path / "sub" / "b.txt").write_text("\n".join(reversed(FILLER * 3)))
    (path / "notes.md").write_text("not training text")
    return path


def _args(checkpoint, corpus, out, *extra):
    return ["train", "--model", str(checkpoint), "--data", str(corpus), "--out", str(out), "--compression-ratio", "2",
            "--window", "8", "--seq-len", "40", "--steps", "6", "--ramp-steps-per-unit", "2", "--lr", "1e-2",
            "--log-every", "3", *extra]


def test_train_writes_a_checkpoint_the_suite_loads(checkpoint, corpus, tmp_path, capsys):
    out = tmp_path / "dms"
    assert main(_args(checkpoint, corpus, out)) == 0
    captured = capsys.readouterr()
    assert "borrowed channel zeroed first" in captured.err
    assert "step 3/6" in captured.err and "step 6/6" in captured.err
    assert captured.out.startswith(f"wrote {out}: last step evicted ")
    config = json.loads((out / "config.json").read_text())
    assert (config["dms_window_size"], config["dms_cr"], config["dms_alpha_scale"]) == (8, 2, 100.0)
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    record = json.loads((out / "retrofit.json").read_text())
    assert record["source"] == str(checkpoint) and record["seq_len"] == 40 and record["train"] == "decision"
    history = record["history"]
    assert len(history) == 6 and history[0]["eviction_rate"] == 0.0 and history[-1]["eviction_rate"] > 0.1
    model = load_model(out, backend="hub", dtype=torch.float32)
    ids = torch.randint(0, config["vocab_size"], (1, 30))
    with torch.no_grad():
        assert model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False).shape == (1, 34)


def test_train_is_listed_with_its_options(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "train" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for option in ("--model", "--out", "--data", "--compression-ratio", "--window", "--steps", "--seq-len", "--batch",
                   "--lr", "--device", "--seed", "--tau", "--ramp-steps-per-unit", "--train"):
        assert option in out
    assert "(default: 8)" in out and "None" not in out


@pytest.mark.parametrize(("change", "message"), [
    (["--compression-ratio", "0.5"], "--compression-ratio must be >= 1, got 0.5"),
    (["--window", "-1"], "--window must be >= 0, got -1"),
    (["--seq-len", "9"], "--seq-len 9 leaves no token outside the window of 8"),
    (["--model", "MISSING"], "--model MISSING: no such directory"),
    (["--data", "MISSING"], "--data MISSING: no such file or directory"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    (["--out", "NONEMPTY"], "the directory is not empty"),
    (["--seq-len", "5000"], "--seq-len 5000 exceeds the model's max_position_embeddings (512)"),
])
def test_bad_options_are_one_line_and_exit_2(checkpoint, corpus, tmp_path, capsys, change, message):
    nonempty = tmp_path / "full"
    nonempty.mkdir()
    (nonempty / "x").write_text("")
    substitutes = {"MISSING": str(tmp_path / "missing"), "NONEMPTY": str(nonempty)}
    change = [substitutes.get(c, c) for c in change]
    message = message.replace("MISSING", str(tmp_path / "missing"))
    code = main([*_without(_args(checkpoint, corpus, tmp_path / "out"), change[0]), *change])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("dms-perf train: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def _without(args, option):
    """``args`` less ``option`` and its value, if there."""
    if option not in args:
        return args
    at = args.index(option)
    return args[:at] + args[at + 2:]
