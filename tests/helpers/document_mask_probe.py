"""Does a packed sample see only itself? Builds the quickstart's multimodal model on one
process three times from the same weights: `data.document_mask` true with the fused attention
(`masked`, the default: FlexAttention over the segment ids), true with the dense mask
(`dense_mask`), and false (`unmasked`); and scores sample B (an audio clip and its caption)
in three sequences:

  * `packed`: [A, B], A an image and its caption,
  * `other`:  [A', B], A' another image and other caption tokens of the same lengths,
  * `alone`:  [B], B first in its sequence.

Prints one JSON line: for each setting, the largest per-token loss difference on B's tokens
between packed and other, and between packed and alone (B's tokens at other positions:
RoPE sees only distances inside B, so only rounding differs), and whether a masked model
refuses a forward without a mask; and `fused_vs_dense`, the largest difference between the
two masked settings' losses on the packed sequence (all its tokens, A's and B's), and
`fused_vs_dense_grad`, the largest difference between their parameter gradients of the
packed sequence's summed loss, relative to the largest gradient. A fourth model, `masked_mtp`,
is `masked` plus one MTP layer (its attention takes the same segment ids; megatron-core's MTP
refuses the dense mask's `arbitrary` mask type): the same main losses, and finite gradients.

    python tests/helpers/document_mask_probe.py
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from megatron_mm.config import load_config  # noqa: E402
from megatron_mm.models.attention_mask import document_attention_mode, packed_inputs  # noqa: E402
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

    def losses(model, documents, first, image_first) -> torch.Tensor:
        parts = ([first] if first is not None else []) + [b]
        tokens = torch.cat(parts)[None]  # [1, s + 1]
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        segments = torch.cat([torch.full((len(p),), i) for i, p in enumerate(parts, 1)])[None, :-1]
        positions = torch.arange(inputs.shape[1])[None]
        media = {"mels": mel, **({"images": image_first} if first is not None else {})}
        return model(inputs, positions, labels=labels, **packed_inputs(documents, segments), **media)[0]

    def of_b(loss: torch.Tensor) -> torch.Tensor:
        return loss[-(len(b) - 1):]  # the losses of predicting B's tokens 2.. from B's tokens

    settings = {"masked": ["data.document_mask=true", "model.document_attention=fused"],
                "dense_mask": ["data.document_mask=true", "model.document_attention=dense_mask"],
                "unmasked": ["data.document_mask=false"],
                "masked_mtp": ["data.document_mask=true", "model.document_attention=fused", "model.mtp_num_layers=1"]}
    out, weights, packed_losses, grads = {}, None, {}, {}
    for key, overrides in settings.items():
        cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"), overrides)
        documents = document_attention_mode(cfg, False)
        compat.seed_everything(0)
        tc = transformer_config(cfg, compat.transformer_config_overrides(hardware))
        model = build_model_chunks(cfg, tc, False, PLACEHOLDERS)[0].eval()
        if weights is None:
            weights = model.state_dict()
        else:
            missing, unexpected = model.load_state_dict(weights, strict=False)
            assert not unexpected and all(k.startswith("mtp.") for k in missing), (missing, unexpected)
        with torch.no_grad():
            packed_losses[key] = losses(model, documents, a, image)
            packed = of_b(packed_losses[key])
            other = of_b(losses(model, documents, a_other, image_other))
            alone = of_b(losses(model, documents, None, None))
            refuses = None
            if documents is not None:
                try:
                    model(torch.cat([a, b])[None, :-1], torch.arange(len(a) + len(b) - 1)[None], None,
                          labels=torch.cat([a, b])[None, 1:], images=image, mels=mel)
                    refuses = False
                except ValueError as err:
                    refuses = "attention_mask" in str(err)
        losses(model, documents, a, image).sum().backward()
        grads[key] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        out[key] = {"vs_other": float((packed - other).abs().max()), "vs_alone": float((packed - alone).abs().max()),
                    "mean_loss": float(packed.mean())}
        if refuses is not None:
            out[key]["refuses_no_mask"] = refuses
    out["fused_vs_dense"] = float((packed_losses["masked"] - packed_losses["dense_mask"]).abs().max())
    fused, dense = grads["masked"], grads["dense_mask"]
    out["fused_vs_dense_grad"] = float((fused - dense).abs().max() / dense.abs().max())
    out["gradients"] = len(dense)
    out["masked_mtp"]["vs_masked"] = float((packed_losses["masked_mtp"] - packed_losses["masked"]).abs().max())
    out["masked_mtp"]["grads_finite"] = bool(grads["masked_mtp"].isfinite().all())
    runtime.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
