"""Does a packed sample see only itself? Builds the quickstart's multimodal model on one
process twice from the same weights, with `data.document_mask` true and false, and scores
sample B (an audio clip and its caption) in three sequences:

  * `packed`: [A, B], A an image and its caption,
  * `other`:  [A', B], A' another image and other caption tokens of the same lengths,
  * `alone`:  [B], B first in its sequence.

Prints one JSON line: for each setting, the largest per-token loss difference on B's tokens
between packed and other, and between packed and alone (B's tokens at other positions:
RoPE sees only distances inside B, so only rounding differs), and whether the masked model
refuses a forward without a mask.

    python tests/helpers/document_mask_probe.py
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from megatron_mm.config import load_config  # noqa: E402
from megatron_mm.models.attention_mask import document_attention_mask  # noqa: E402
from megatron_mm.models.gpt import build_model_chunks, transformer_config  # noqa: E402
from megatron_mm.runtime import compat  # noqa: E402
from megatron_mm.runtime import distributed as runtime  # noqa: E402

PLACEHOLDERS = {"image": 3, "audio": 4}
CAPTION = 24  # text tokens after each sample's media tokens


def main() -> None:
    env = runtime.dist_env({})
    hardware = runtime.detect_hardware()
    runtime.init_distributed(env, hardware)
    base = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"))
    runtime.init_model_parallel(base.parallel)
    compat.apply(hardware)
    m = base.model
    g = torch.Generator().manual_seed(0)

    def sample(kind: str) -> torch.Tensor:
        media = m.vision.num_tokens if kind == "image" else m.audio.num_tokens
        text = torch.randint(10, m.vocab_size, (CAPTION,), generator=g)
        return torch.cat([torch.full((media,), PLACEHOLDERS[kind]), text])

    a, a_other, b = sample("image"), sample("image"), sample("audio")
    image, image_other = (torch.randn(1, 3, m.vision.image_size, m.vision.image_size, generator=g) for _ in range(2))
    mel = torch.randn(1, m.audio.num_mel_bins, m.audio.max_frames, generator=g)

    def losses_of_b(model, masks_documents: bool, first, image_first) -> torch.Tensor:
        parts = ([first] if first is not None else []) + [b]
        tokens = torch.cat(parts)[None]  # [1, s + 1]
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        segments = torch.cat([torch.full((len(p),), i) for i, p in enumerate(parts, 1)])[None, :-1]
        positions = torch.arange(inputs.shape[1])[None]
        mask = document_attention_mask(segments) if masks_documents else None
        media = {"mels": mel, **({"images": image_first} if first is not None else {})}
        loss = model(inputs, positions, mask, labels=labels, **media)[0]
        return loss[-(len(b) - 1):]  # the losses of predicting B's tokens 2.. from B's tokens

    out, weights = {}, None
    for masks_documents in (True, False):
        cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"),
                          [f"data.document_mask={str(masks_documents).lower()}"])
        compat.seed_everything(0)
        tc = transformer_config(cfg, compat.transformer_config_overrides(hardware))
        model = build_model_chunks(cfg, tc, False, PLACEHOLDERS)[0].eval()
        if weights is None:
            weights = model.state_dict()
        else:
            model.load_state_dict(weights)
        with torch.no_grad():
            packed = losses_of_b(model, masks_documents, a, image)
            other = losses_of_b(model, masks_documents, a_other, image_other)
            alone = losses_of_b(model, masks_documents, None, None)
            refuses = None
            if masks_documents:
                try:
                    model(torch.cat([a, b])[None, :-1], torch.arange(len(a) + len(b) - 1)[None], None,
                          labels=torch.cat([a, b])[None, 1:], images=image, mels=mel)
                    refuses = False
                except ValueError as err:
                    refuses = "attention_mask" in str(err)
        key = "masked" if masks_documents else "unmasked"
        out[key] = {"vs_other": float((packed - other).abs().max()), "vs_alone": float((packed - alone).abs().max()),
                    "mean_loss": float(packed.mean())}
        if refuses is not None:
            out[key]["refuses_no_mask"] = refuses
    runtime.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
