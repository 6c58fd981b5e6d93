"""Tiny random-weight Hugging Face folders of the published kinds we import, so the whole
"start from published models" flow runs offline (no weights can be downloaded here):

* `lm/`: a `DeepseekV3ForCausalLM` (MoE + MLA, 4 layers, hidden 48) with a byte-level BPE
  tokenizer trained by `tokenizers` on the demo set's captions (`tokenizer.json` +
  `tokenizer_config.json`, DeepSeek's begin/end-of-sentence tokens, no multimodal pieces: the
  import adds them);
* `siglip/`: a `SiglipVisionModel` (32 px images, 8 px patches) + `SiglipImageProcessor`;
* `clip/`: a `CLIPVisionModel` (same sizes) + `CLIPImageProcessor` (shortest-edge resize, centre crop);
* `whisper/`: a `WhisperModel` (80 mel bins, 1 s window: 100 frames, 50 positions) +
  `WhisperFeatureExtractor`.

Each model is built by `transformers` from its config with `torch.manual_seed(seed + i)` and
written with `save_pretrained` (processors too), so the folders are the same for the same seed.
"""

from __future__ import annotations

import itertools
import os

import torch

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"  # DeepSeek-V3's own
TOKENIZER_VOCAB = 320  # byte-level: 256 bytes + merges + BOS/EOS
IMAGE_SIZE, PATCH_SIZE = 32, 8


def training_sentences() -> list[str]:
    """Every caption of the demo set's attribute combinations (deterministic, built in)."""
    from megatron_mm.data.multimodal.demo import describe_audio, describe_image, image_label, audio_label
    from megatron_mm.data.multimodal.demo_media import COLOURS, PITCHES, PLACEMENTS, SHAPES, SOUNDS, VOLUMES

    images = [describe_image(image_label(*c)) + "." for c in itertools.product(SHAPES, COLOURS, PLACEMENTS)]
    sounds = [describe_audio(audio_label(*c)) + "." for c in itertools.product(PITCHES, SOUNDS, VOLUMES)]
    return images + sounds + ["What shape is this?", "What colour is the shape?", "Is this sound low, medium or high?",
                              "Is this a tone or a chord?", "Describe the picture.", "What do you hear?"]


def write_tokenizer(out: str) -> int:
    """A byte-level BPE on `training_sentences`, saved as a fast-tokenizer folder; its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_sentences(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)
    fast.save_pretrained(out)
    return tok.get_vocab_size(with_added_tokens=True)


def write_lm(out: str, seed: int) -> None:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    vocab = write_tokenizer(out)
    config = DeepseekV3Config(
        vocab_size=vocab, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4,
        routed_scaling_factor=1.0, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=12,
        qk_nope_head_dim=12, n_group=1, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        norm_topk_prob=True, max_position_embeddings=256, initializer_range=0.1, num_nextn_predict_layers=0,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(seed)
    DeepseekV3ForCausalLM(config).save_pretrained(out)


def write_siglip(out: str, seed: int) -> None:
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    torch.manual_seed(seed)
    SiglipVisionModel(config).save_pretrained(out)
    SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(out)


def write_clip(out: str, seed: int) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32)
    torch.manual_seed(seed)
    CLIPVisionModel(config).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(out)


def write_whisper(out: str, seed: int) -> None:
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    config = WhisperConfig(
        vocab_size=64, num_mel_bins=80, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=50,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        begin_suppress_tokens=None, suppress_tokens=None)
    torch.manual_seed(seed)
    WhisperModel(config).save_pretrained(out)
    WhisperFeatureExtractor(feature_size=80, chunk_length=1).save_pretrained(out)  # 1 s: 100 frames


KINDS = {"lm": write_lm, "siglip": write_siglip, "clip": write_clip, "whisper": write_whisper}


def make_tiny_hf(out: str, seed: int = 0) -> dict[str, str]:
    """Write every kind into `out/<kind>`; return {kind: folder}."""
    folders = {}
    for i, (kind, write) in enumerate(KINDS.items()):
        folders[kind] = os.path.join(out, kind)
        write(folders[kind], seed + i)
    return folders
