"""A tiny random-weight FLUX model set: the test fixture and every user's no-download smoke test.

Same architecture code as the real models (DiffSynth's modules with small sizes), written in
the real on-disk layout and file names, loaded by the same loader with the same float8 path.
Images it makes are noise by design.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffsynth.models import flux_dit, flux_vae
from diffsynth.models.flux_text_encoder_clip import CLIPEncoderLayer, FluxTextEncoderClip
from diffsynth.models.flux_text_encoder_t5 import FluxTextEncoderT5
from diffsynth.models.general_modules import TimestepEmbeddings
from safetensors.torch import save_file
from transformers import T5Config, T5EncoderModel

from . import layouts
from .weights import DIT_FILE, FLUX_DIR, missing_files, model_files

log = logging.getLogger("fluxbot.engine.tiny")

HIDDEN = 128  # one attention head of 128 (RoPE needs head dim 128)
TEXT_DIM = 32  # T5 d_model
POOLED_DIM = 32  # CLIP width
VOCAB = 512  # both tokenizers stay below this
VAE_CH = (32, 32, 16, 8)  # real: (512, 512, 256, 128)
VAE_GROUPS = 8  # real: 32
SEED = 20240801


class TinyFluxDiT(flux_dit.FluxDiT):
    """FluxDiT with hidden 128, one double and one single block."""

    def __init__(self, disable_guidance_embedder=False, input_dim=64, num_blocks=1):
        torch.nn.Module.__init__(self)
        d = HIDDEN
        self.pos_embedder = flux_dit.RoPEEmbedding(d, 10000, [16, 56, 56])
        self.time_embedder = TimestepEmbeddings(256, d)
        self.guidance_embedder = None if disable_guidance_embedder else TimestepEmbeddings(256, d)
        self.pooled_text_embedder = torch.nn.Sequential(
            torch.nn.Linear(POOLED_DIM, d), torch.nn.SiLU(), torch.nn.Linear(d, d)
        )
        self.context_embedder = torch.nn.Linear(TEXT_DIM, d)
        self.x_embedder = torch.nn.Linear(input_dim, d)
        self.blocks = torch.nn.ModuleList([flux_dit.FluxJointTransformerBlock(d, 1) for _ in range(num_blocks)])
        self.single_blocks = torch.nn.ModuleList([flux_dit.FluxSingleTransformerBlock(d, 1)])
        self.final_norm_out = flux_dit.AdaLayerNormContinuous(d)
        self.final_proj_out = torch.nn.Linear(d, 64)
        self.input_dim = input_dim


class TinyClip(FluxTextEncoderClip):
    """CLIP text encoder, width 32, two layers (FLUX uses clip_skip=2, so at least two)."""

    def __init__(self):
        torch.nn.Module.__init__(self)
        d = POOLED_DIM
        self.token_embedding = torch.nn.Embedding(VOCAB, d)
        self.position_embeds = torch.nn.Parameter(torch.zeros(1, 77, d))
        self.encoders = torch.nn.ModuleList(
            [CLIPEncoderLayer(d, 2 * d, num_heads=2, head_dim=d // 2) for _ in range(2)]
        )
        self.attn_mask = self.attention_mask(77)
        self.final_layer_norm = torch.nn.LayerNorm(d)


def tiny_t5_config() -> T5Config:
    return T5Config(
        d_ff=2 * TEXT_DIM,
        d_kv=16,
        d_model=TEXT_DIM,
        num_heads=2,
        num_layers=1,
        feed_forward_proj="gated-gelu",
        dense_act_fn="gelu_new",
        is_gated_act=True,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        vocab_size=VOCAB,
        pad_token_id=0,
        eos_token_id=1,
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
        is_encoder_decoder=True,
        use_cache=False,
    )


class TinyT5(FluxTextEncoderT5):
    def __init__(self):
        T5EncoderModel.__init__(self, tiny_t5_config())


def _resnet(cin, cout):
    return flux_vae.ResnetBlock(cin, cout, groups=VAE_GROUPS, eps=1e-6)


class TinyVAEDecoder(flux_vae.FluxVAEDecoder):
    def __init__(self, use_conv_attention=True):
        torch.nn.Module.__init__(self)
        a, b, c, e = VAE_CH
        self.scaling_factor = 0.3611
        self.shift_factor = 0.1159
        self.conv_in = torch.nn.Conv2d(16, a, kernel_size=3, padding=1)
        self.blocks = torch.nn.ModuleList(
            [
                _resnet(a, a),
                flux_vae.VAEAttentionBlock(
                    1, a, a, 1, norm_num_groups=VAE_GROUPS, eps=1e-6, use_conv_attention=use_conv_attention
                ),
                _resnet(a, a),
                _resnet(a, a),
                _resnet(a, a),
                _resnet(a, a),
                flux_vae.UpSampler(a),
                _resnet(a, b),
                _resnet(b, b),
                _resnet(b, b),
                flux_vae.UpSampler(b),
                _resnet(b, c),
                _resnet(c, c),
                _resnet(c, c),
                flux_vae.UpSampler(c),
                _resnet(c, e),
                _resnet(e, e),
                _resnet(e, e),
            ]
        )
        self.conv_norm_out = torch.nn.GroupNorm(num_channels=e, num_groups=VAE_GROUPS, eps=1e-6)
        self.conv_act = torch.nn.SiLU()
        self.conv_out = torch.nn.Conv2d(e, 3, kernel_size=3, padding=1)


class TinyVAEEncoder(flux_vae.FluxVAEEncoder):
    def __init__(self, use_conv_attention=True):
        torch.nn.Module.__init__(self)
        a, b, c, e = VAE_CH
        self.scaling_factor = 0.3611
        self.shift_factor = 0.1159
        self.conv_in = torch.nn.Conv2d(3, e, kernel_size=3, padding=1)
        down = dict(padding=0, extra_padding=True)
        self.blocks = torch.nn.ModuleList(
            [
                _resnet(e, e),
                _resnet(e, e),
                flux_vae.DownSampler(e, **down),
                _resnet(e, c),
                _resnet(c, c),
                flux_vae.DownSampler(c, **down),
                _resnet(c, a),
                _resnet(a, a),
                flux_vae.DownSampler(a, **down),
                _resnet(a, a),
                _resnet(a, a),
                _resnet(a, a),
                flux_vae.VAEAttentionBlock(
                    1, a, a, 1, norm_num_groups=VAE_GROUPS, eps=1e-6, use_conv_attention=use_conv_attention
                ),
                _resnet(a, a),
            ]
        )
        self.conv_norm_out = torch.nn.GroupNorm(num_channels=a, num_groups=VAE_GROUPS, eps=1e-6)
        self.conv_act = torch.nn.SiLU()
        self.conv_out = torch.nn.Conv2d(a, 32, kernel_size=3, padding=1)


def _randomize(module: torch.nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights with sane scales so activations stay finite through every layer."""
    out = {}
    for name, p in module.state_dict().items():
        if p.dim() == 1 and "norm" in name and name.endswith("weight"):  # norm scales start at one
            t = torch.ones_like(p)
        elif p.dim() == 1:
            t = torch.randn(p.shape, generator=gen) * 0.02
        else:
            fan_in = p[0].numel()
            t = torch.randn(p.shape, generator=gen) / (fan_in**0.5)
        out[name] = t.to(torch.bfloat16).contiguous()
    return out


# ----------------------------------------------------------------------------- tokenizers

_CORPUS = [
    "a photo of a cat sitting on a red chair in the sun",
    "an oil painting of a lighthouse on a cliff at dusk, dramatic sky",
    "portrait of a woman with blue eyes, studio light, 85mm lens",
    "a futuristic city at night with neon lights and rain",
    "a bowl of fruit on a wooden table, still life, soft shadows",
    "mountains, forest, river, snow, clouds, sunrise, landscape",
]


def _write_clip_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(folder))  # vocab.json + merges.txt
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "do_lower_case": True,
                "tokenizer_class": "CLIPTokenizer",
            }
        )
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
            }
        )
    )


def _write_t5_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=200,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "model_max_length": 512,
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "extra_ids": 0,
                "tokenizer_class": "T5Tokenizer",
            }
        )
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
            }
        )
    )


# ----------------------------------------------------------------------------- writing


def build_state_dicts(seed: int = SEED) -> dict[str, dict[str, torch.Tensor]]:
    """Tiny random weights, already in the original file layouts, keyed by relative file path."""
    gen = torch.Generator().manual_seed(seed)
    dit = _randomize(TinyFluxDiT(), gen)
    clip = _randomize(TinyClip(), gen)
    t5 = _randomize(TinyT5(), gen)
    enc = _randomize(TinyVAEEncoder(), gen)
    dec = _randomize(TinyVAEDecoder(), gen)
    t5_file = layouts.t5_to_transformers(t5)
    keys = sorted(t5_file)
    half = len(keys) // 2
    return {
        # In float8, as the DiT is stored (and as the full-size benchmark file is written): the
        # loader then keeps its tensors as views of the memory-mapped file, as it does for real files.
        DIT_FILE: {k: v.to(torch.float8_e4m3fn) for k, v in layouts.dit_to_bfl(dit).items()},
        f"{FLUX_DIR}/ae.safetensors": layouts.vae_to_bfl(enc, dec),
        f"{FLUX_DIR}/text_encoder/model.safetensors": layouts.clip_to_transformers(clip),
        f"{FLUX_DIR}/text_encoder_2/model-00001-of-00002.safetensors": {k: t5_file[k] for k in keys[:half]},
        f"{FLUX_DIR}/text_encoder_2/model-00002-of-00002.safetensors": {k: t5_file[k] for k in keys[half:]},
    }


def write_tiny_model(root: Path, seed: int = SEED) -> Path:
    """Write the tiny model set under `root` in the real layout (idempotent). Returns root."""
    root = Path(root)
    if not missing_files(root):
        return root
    log.info("writing the tiny random model to %s", root)
    for rel, sd in build_state_dicts(seed).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(sd, str(tmp))
        tmp.replace(path)
    _write_clip_tokenizer(root / FLUX_DIR / "tokenizer")
    _write_t5_tokenizer(root / FLUX_DIR / "tokenizer_2")
    return root


# ----------------------------------------------------------------------------- loader registration

_CLASSES = {
    "flux_dit": (
        "bot.engine.tiny.TinyFluxDiT",
        "diffsynth.models.flux_dit.FluxDiT",
        "diffsynth.utils.state_dict_converters.flux_dit.FluxDiTStateDictConverter",
    ),
    "flux_text_encoder_clip": (
        "bot.engine.tiny.TinyClip",
        "diffsynth.models.flux_text_encoder_clip.FluxTextEncoderClip",
        "diffsynth.utils.state_dict_converters.flux_text_encoder_clip.FluxTextEncoderClipStateDictConverter",
    ),
    "flux_text_encoder_t5": (
        "bot.engine.tiny.TinyT5",
        "diffsynth.models.flux_text_encoder_t5.FluxTextEncoderT5",
        "diffsynth.utils.state_dict_converters.flux_text_encoder_t5.FluxTextEncoderT5StateDictConverter",
    ),
    "flux_vae_encoder": (
        "bot.engine.tiny.TinyVAEEncoder",
        "diffsynth.models.flux_vae.FluxVAEEncoder",
        "diffsynth.utils.state_dict_converters.flux_vae.FluxVAEEncoderStateDictConverter",
    ),
    "flux_vae_decoder": (
        "bot.engine.tiny.TinyVAEDecoder",
        "diffsynth.models.flux_vae.FluxVAEDecoder",
        "diffsynth.utils.state_dict_converters.flux_vae.FluxVAEDecoderStateDictConverter",
    ),
}


def register_with_diffsynth(root: Path) -> None:
    """Teach DiffSynth's model registry the tiny files' key/shape hashes (as it knows the real ones)."""
    from diffsynth.configs import MODEL_CONFIGS, VRAM_MANAGEMENT_MODULE_MAPS
    from diffsynth.core.loader import hash_model_file

    files = model_files(Path(root))
    hashes = {
        "flux_dit": hash_model_file(str(files.dit)),
        "flux_text_encoder_clip": hash_model_file(str(files.clip)),
        "flux_text_encoder_t5": hash_model_file([str(p) for p in files.t5]),
        "flux_vae_encoder": hash_model_file(str(files.vae)),
        "flux_vae_decoder": hash_model_file(str(files.vae)),
    }
    known = {(c["model_hash"], c["model_name"]) for c in MODEL_CONFIGS}
    for name, model_hash in hashes.items():
        cls, real_cls, converter = _CLASSES[name]
        if (model_hash, name) not in known:
            MODEL_CONFIGS.append(
                {"model_hash": model_hash, "model_name": name, "model_class": cls, "state_dict_converter": converter}
            )
        if real_cls in VRAM_MANAGEMENT_MODULE_MAPS:
            VRAM_MANAGEMENT_MODULE_MAPS.setdefault(cls, VRAM_MANAGEMENT_MODULE_MAPS[real_cls])
