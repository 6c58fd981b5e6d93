"""Starting from published models: Hugging Face tokenizer folders as `data.tokenizer`, the
vocabulary growth of the LM import, tools/make_tiny_hf.py's folders, tools/generate.py
(greedy = transformers' generate(), sampling seeded, an image prompt)."""

import importlib.util
import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import QUICKSTART_MULTIMODAL, ROOT, losses, pretrain, tool
from megatron_mm.config import ConfigError
from megatron_mm.conversion.dcp import DistCheckpointReader
from megatron_mm.conversion.from_hf import convert_from_hf
from megatron_mm.conversion.tiny_hf import BOS, EOS, TOKENIZER_VOCAB, write_lm, write_tokenizer
from megatron_mm.conversion.to_hf import convert_to_hf
from megatron_mm.data.tokenizer import MULTIMODAL_SPECIAL_TOKENS, check_fits, open_tokenizer

TINY_ROWS = 384  # 320 tokens + 5 pieces + <pad> = 326, padded to the next multiple of 128
ADDED = list(MULTIMODAL_SPECIAL_TOKENS) + ["<pad>"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A tiny DeepseekV3 folder with its BPE tokenizer, imported (vocabulary grown)."""
    root = tmp_path_factory.mktemp("hf-start")
    hf, ckpt, run = str(root / "lm"), str(root / "ckpt"), str(root / "run")
    write_lm(hf, seed=0)
    summary = convert_from_hf(hf, ckpt, progress=False)
    text = root / "text.txt"
    text.write_text("\n\n".join(f"a red circle on the left. a quiet low tone number {i}." for i in range(60)))
    return {"root": root, "hf": hf, "ckpt": ckpt, "run": run, "summary": summary, "text": str(text)}


@pytest.fixture(scope="module")
def trained(imported):
    """The imported checkpoint trained 3 steps on text prepared with its extended tokenizer;
    the run's checkpoints folder."""
    root, ckpt, run = imported["root"], imported["ckpt"], imported["run"]
    spec = importlib.util.spec_from_file_location("prepare_data", os.path.join(ROOT, "tools", "prepare_data.py"))
    prepare_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare_data)
    assert prepare_data.main(["--input", imported["text"], "--out", str(root / "text"),
                              "--tokenizer", os.path.join(ckpt, "tokenizer")]) == 0
    pretrain(1, ["data.source=indexed", f"data.prefix={root / 'text'}", f"checkpoint.load={ckpt}", f"run.dir={run}",
                 "train.steps=3", "model.seq_length=32", "train.global_batch_size=4", "train.micro_batch_size=1",
                 "logging.tensorboard=false", f"data.cache_dir={root / 'cache'}"],
             config=os.path.join(ckpt, "config.yaml"))
    return os.path.join(run, "checkpoints")


# --------------------------------------------------------------------------- tokenizer folders


def test_hf_tokenizer_folder_gets_the_multimodal_pieces(tmp_path):
    from transformers import AutoTokenizer

    folder = str(tmp_path / "tok")
    assert write_tokenizer(folder) == TOKENIZER_VOCAB
    tok = open_tokenizer(folder)
    assert tok.added == ADDED
    assert [tok.special_token_id(t) for t in ADDED] == list(range(TOKENIZER_VOCAB, TOKENIZER_VOCAB + 6))
    assert tok.vocab_size == TOKENIZER_VOCAB + 6 and tok.eod == tok.vocab[EOS] and tok.bos == tok.vocab[BOS]
    assert tok.pad == tok.vocab["<pad>"]
    text = "<image> a red circle <|user|>What colour?<|end|>"
    ids = tok.tokenize(text)
    assert ids[0] == tok.special_token_id("<image>") and tok.special_token_id("<|end|>") == ids[-1]
    assert tok.detokenize(ids) == text
    # the extended folder is what transformers reads, with the same ids; the original's ids are unchanged
    tok.save(str(tmp_path / "extended"))
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "extended"))
    assert hf(text, add_special_tokens=False).input_ids == ids and hf.pad_token_id == tok.pad
    plain = "a loud high chord."
    assert AutoTokenizer.from_pretrained(folder)(plain, add_special_tokens=False).input_ids == tok.tokenize(plain)
    again = open_tokenizer(str(tmp_path / "extended"))
    assert again.added == [] and again.vocab == tok.vocab and again.pad == tok.pad


def test_tokenizer_larger_than_the_embedding_is_refused_in_one_line(tmp_path):
    folder = str(tmp_path / "tok")
    write_tokenizer(folder)
    with pytest.raises(ConfigError) as err:
        check_fits(open_tokenizer(folder), 320)
    assert err.value.problems == [
        f"data.tokenizer={folder}: has 326 tokens, more than model.vocab_size=320 (the model's embedding rows); "
        f"set model.vocab_size to at least 326 (tools/convert_from_hf.py grows an imported model's)"]
    os.remove(os.path.join(folder, "tokenizer.json"))
    with pytest.raises(ValueError, match=r"no tokenizer.json \(a Hugging Face tokenizer folder needs one"):
        open_tokenizer(folder)


def test_training_refuses_a_tokenizer_past_the_embedding(imported):
    """Where a run opens its data, before the model is built (`data.build_datasets` for text
    sources; StepData calls the same check for multimodal ones): the one line."""
    from megatron_mm.config import load_config
    from megatron_mm.data import build_datasets

    cfg = load_config(os.path.join(imported["ckpt"], "config.yaml"), ["data.source=indexed", "model.vocab_size=256"])
    tokenizer = os.path.join(imported["ckpt"], "tokenizer")
    with pytest.raises(ConfigError) as err:
        build_datasets(cfg, "unused-prefix", tokenizer)
    assert err.value.problems[0].startswith(
        f"data.tokenizer={tokenizer}: has 326 tokens, more than model.vocab_size=256")


# --------------------------------------------------------------------------- vocabulary growth


def test_import_grows_the_vocabulary(imported):
    summary, ckpt = imported["summary"], imported["ckpt"]
    assert summary["vocab_size"] == TINY_ROWS and summary["added_tokens"] == ADDED
    assert summary["tokenizer"] == os.path.abspath(os.path.join(ckpt, "tokenizer"))
    hf = load_file(os.path.join(imported["hf"], "model.safetensors"))
    reader = DistCheckpointReader(ckpt)
    for ours, theirs in (("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
                         ("output_layer.weight", "lm_head.weight")):
        grown, old = reader.read(ours), hf[theirs]
        assert grown.shape == (TINY_ROWS, old.shape[1]) and old.shape[0] == TOKENIZER_VOCAB
        assert torch.equal(grown[:TOKENIZER_VOCAB], old)  # old rows identical
        mean = old.double().mean(dim=0)
        assert (grown[TOKENIZER_VOCAB:].double() - mean).abs().max() < 1e-7  # new rows = mean (fp32 rounding)
    stored = reader.common["config"]
    assert stored["model"]["vocab_size"] == TINY_ROWS and stored["data"]["tokenizer"] == summary["tokenizer"]
    with open(os.path.join(ckpt, "config.yaml")) as f:
        assert yaml.safe_load(f) == stored
    assert open_tokenizer(summary["tokenizer"]).vocab_size == TOKENIZER_VOCAB + 6


def test_grown_vocabulary_splits_under_tp2(imported):
    """384 rows as TP2 chunks (192 a rank): the same global tensors as the one-rank import."""
    from megatron_mm.config import ParallelConfig

    out = str(imported["root"] / "tp2")
    summary = convert_from_hf(imported["hf"], out, ParallelConfig(tp=2, sequence_parallel=True), progress=False)
    assert summary["files"] == 2 and summary["vocab_size"] == TINY_ROWS
    one, two = DistCheckpointReader(imported["ckpt"]), DistCheckpointReader(out)
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        assert torch.equal(one.read(key), two.read(key))


def test_resumed_training_runs_with_the_hf_tokenizer(imported, trained):
    steps = losses(imported["run"])
    assert sorted(steps) == [1, 2, 3] and all(4.0 < loss < 7.0 for loss in steps.values())  # ~ln(384) = 5.95


# --------------------------------------------------------------------------- make_tiny_hf


def test_make_tiny_hf_folders_load_with_transformers(tmp_path, capsys):
    from transformers import (AutoFeatureExtractor, AutoImageProcessor, AutoModel, AutoModelForCausalLM,
                              AutoTokenizer)

    code, out, _ = tool("make_tiny_hf", ["--out", str(tmp_path / "a"), "--seed", "3"], capsys)
    folders = json.loads(out.strip().splitlines()[-1])
    assert code == 0
    kinds = {"siglip": "SiglipVisionModel", "clip": "CLIPVisionModel", "whisper": "WhisperModel"}
    for kind, cls in kinds.items():
        assert type(AutoModel.from_pretrained(folders[kind])).__name__ == cls
    lm = AutoModelForCausalLM.from_pretrained(folders["lm"])
    assert type(lm).__name__ == "DeepseekV3ForCausalLM" and lm.config.vocab_size == TOKENIZER_VOCAB
    assert len(AutoTokenizer.from_pretrained(folders["lm"])) == TOKENIZER_VOCAB
    pixels = AutoImageProcessor.from_pretrained(folders["clip"])(torch.zeros(3, 50, 40), return_tensors="pt")
    assert pixels.pixel_values.shape == (1, 3, 32, 32)  # shortest edge 32, centre crop 32
    features = AutoFeatureExtractor.from_pretrained(folders["whisper"])([0.0] * 8000, sampling_rate=16000,
                                                                        return_tensors="pt")
    assert features.input_features.shape == (1, 80, 100)  # padded to the 1 s window
    # deterministic from --seed
    write_lm(str(tmp_path / "b"), seed=3)
    same, other = load_file(os.path.join(folders["lm"], "model.safetensors")), load_file(
        os.path.join(tmp_path / "b", "model.safetensors"))
    assert same.keys() == other.keys() and all(torch.equal(same[k], other[k]) for k in same)


# --------------------------------------------------------------------------- generate


def _generate(args, capsys) -> dict:
    code, out, err = tool("generate", args, capsys)
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_greedy_generate_equals_transformers(imported, trained, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = _generate(["--checkpoint", trained, "--prompt", "a red circle on", "--max-new-tokens", "8"], capsys)
    assert ours["iteration"] == 3 and len(ours["prompt_ids"]) >= 3
    hf_dir = str(imported["root"] / "exported")
    convert_to_hf(trained, hf_dir, progress=False)  # with the run's tokenizer folder
    assert AutoTokenizer.from_pretrained(hf_dir)("a red circle on", add_special_tokens=False).input_ids == \
        ours["prompt_ids"]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompt = torch.tensor([ours["prompt_ids"]])
    theirs = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                            eos_token_id=ours["ids"][-1] if len(ours["ids"]) < 8 else None, pad_token_id=0)
    assert theirs[0, prompt.shape[1]:].tolist() == ours["ids"]


def test_sampling_is_seeded(trained, capsys):
    args = ["--checkpoint", trained, "--prompt", "a red", "--max-new-tokens", "8", "--temperature", "1.5",
            "--top-p", "0.95", "--seed", "1"]
    first = _generate(args, capsys)
    assert _generate(args, capsys)["ids"] == first["ids"] and len(first["ids"]) >= 1


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    from megatron_mm.training.generate import next_token

    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    def draws(top_p: float, seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return [next_token(logits, 1.0, top_p, generator) for _ in range(300)]

    assert set(draws(0.7, 0)) == {0, 1} and set(draws(0.85, 0)) == {0, 1, 2} and set(draws(1.0, 0)) == {0, 1, 2, 3}
    assert draws(1.0, 0) == draws(1.0, 0) != draws(1.0, 1)
    assert next_token(logits, 0.0, 0.5, torch.Generator()) == 0  # greedy


def test_image_prompt_on_a_multimodal_checkpoint(tmp_path, capsys):
    run = str(tmp_path / "mm")
    pretrain(1, ["train.steps=0", "data.demo_samples=20", f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={run}",
                 "data.loader=torch", "logging.tensorboard=false"], config=QUICKSTART_MULTIMODAL)
    raw = next(p for p in (tmp_path / "cache").glob("demo-*/raw"))
    image = next(str(p) for p in sorted(raw.rglob("*.png")))
    result = _generate(["--checkpoint", os.path.join(run, "checkpoints"), "--prompt", "What shape is this?",
                        "--chat", "--image", image, "--max-new-tokens", "4"], capsys)
    assert result["prompt_ids"].count(4) == 16  # one <image> run of 16 tokens (32 px, 8 px patches)
    assert 1 <= len(result["ids"]) <= 4
