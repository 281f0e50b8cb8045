"""Teachers built in code, with seeded random weights and a tokenizer generated here: no downloads.

`build_tiny_teacher` is SD 1.5's architecture at toy width, so tests and CPU smoke runs exercise exactly the code
paths of SD 1.5; `build_demo_architecture` is the untrained `demo` teacher (jobs/train_teacher.py trains it);
`build_sd15_architecture` is SD 1.5 at full size, for measuring speed and memory.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch

from dmd_ray.method.schedule import check_prediction_type
from dmd_ray.sd.teacher import Teacher, freeze

# Words of the synthetic shapes domain; the generated BPE merges make each of them a single token.
_TINY_WORDS = (
    "a an the and with of on in at to is small large big tiny medium red green blue yellow orange purple pink white "
    "black gray grey brown cyan circle circles square squares triangle triangles star ring cross shape shapes dot "
    "one two three left right top bottom center middle corner upper lower background image photo picture"
).split()
_TINY_MAX_LENGTH = 16  # SD uses 77; short sequences keep the tiny text encoder and cross-attention cheap


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable unicode characters: the BPE base alphabet."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE learning until every word is one symbol: the most frequent adjacent pair first, ties broken by
    the pair itself, so the merges are deterministic. Learned (rather than hand-listed word by word) merges never
    conflict: applying them in rank order, as the tokenizer does, replays the learning and ends in single tokens."""
    seqs = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in dict.fromkeys(words)]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for s in seqs:
            for pair in zip(s, s[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        merged = []
        for s in seqs:
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            merged.append(tuple(out))
        seqs = merged


def _tiny_tokenizer() -> Any:
    """A CLIPTokenizer over CLIP's byte-level alphabet plus the shapes-domain merges, from files written here.

    Vocabulary order follows CLIP's: bytes, bytes + "</w>", merges, then <|startoftext|> and <|endoftext|>.
    """
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    merges = _learn_merges(_TINY_WORDS)
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory(prefix="dmd-ray-tiny-tokenizer-") as d:
        vocab_file, merges_file = os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        # transformers 5 builds the `tokenizers` backend at construction, so the files may go away afterwards;
        # save_pretrained() writes tokenizer.json from that backend.
        tokenizer = CLIPTokenizer(vocab_file, merges_file, model_max_length=_TINY_MAX_LENGTH)
    tokenizer.vocab_file = None  # do not keep pointing at the deleted temporary file
    return tokenizer


def build_small_sd(
    seed: int = 0,
    prediction_type: str = "epsilon",
    text_width: int = 32,
    unet_channels: tuple[int, ...] = (32, 64),
    attention_levels: tuple[bool, ...] = (False, True),
    vae_channels: tuple[int, ...] = (16, 32, 32),
    source: str = "tiny",
) -> Teacher:
    """SD 1.5's architecture and scheduler at a small size, with seeded random weights and the shapes-domain
    tokenizer; no downloads. 32x32 images; latents of 4 channels at 32 / 2**(len(vae_channels) - 1) pixels;
    16-token prompts. The global RNG state is left untouched."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    check_prediction_type(prediction_type)
    tokenizer = _tiny_tokenizer()
    latent_size = 32 // 2 ** (len(vae_channels) - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=text_width,
                intermediate_size=2 * text_width,
                projection_dim=text_width,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=_TINY_MAX_LENGTH,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=latent_size,
            in_channels=4,
            out_channels=4,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels)),
            block_out_channels=unet_channels,
            layers_per_block=1,
            cross_attention_dim=text_width,
            attention_head_dim=4,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
            block_out_channels=vae_channels,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=32,
            scaling_factor=0.18215,
        )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        set_alpha_to_one=False,
        clip_sample=False,
        prediction_type=prediction_type,
    )
    freeze(text_encoder, unet, vae)
    return Teacher(tokenizer, text_encoder, unet, vae, scheduler, source=source)


def build_tiny_teacher(seed: int = 0, prediction_type: str = "epsilon") -> Teacher:
    """The smallest SD: 32x32 images, 4x8x8 latents, 32-dim text; for tests and smoke runs (random weights)."""
    return build_small_sd(seed, prediction_type)


def build_demo_architecture(seed: int = 0, prediction_type: str = "epsilon") -> Teacher:
    """The `demo` teacher's architecture, untrained: jobs/train_teacher.py trains it on the shapes domain."""
    return build_small_sd(seed, prediction_type, text_width=64, unet_channels=(48, 96, 96), attention_levels=(False, True, True),
                          vae_channels=(32, 64, 64), source="demo-architecture")


def build_sd15_architecture(seed: int = 0, prediction_type: str = "epsilon") -> Teacher:
    """Stable Diffusion 1.5's architecture (860M-parameter UNet, CLIP ViT-L/14 text encoder, the SD VAE) with
    seeded random weights: for measuring speed and memory, which do not depend on the weights. Its tokenizer is the
    tiny one at SD's 77-token length (token ids only need to index the embedding table)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _tiny_tokenizer()
    tokenizer.model_max_length = 77
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        )
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
            scaling_factor=0.18215,
        )
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                              set_alpha_to_one=False, skip_prk_steps=True, prediction_type=prediction_type)
    freeze(text_encoder, unet, vae)
    return Teacher(tokenizer, text_encoder, unet, vae, scheduler, source="sd15-architecture")


BUILT_IN = {"tiny": build_tiny_teacher, "sd15-architecture": build_sd15_architecture}
