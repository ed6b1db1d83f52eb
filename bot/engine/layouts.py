"""Write models in the original on-disk key layouts that DiffSynth's loader expects.

DiffSynth loads FLUX files through *state-dict converters* (original names ->
DiffSynth names). The tiny random model and the full-size random benchmark
models are built as DiffSynth modules, so they need the inverse mapping to be
written in the real layouts (BFL `flux1-dev` DiT with the `model.diffusion_model.`
prefix, transformers CLIP/T5, BFL `ae`). The rename tables are read from the
converters' own source so they cannot drift from the installed DiffSynth.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re

import torch
from diffsynth.utils.state_dict_converters import flux_dit as _dit_conv
from diffsynth.utils.state_dict_converters import flux_vae as _vae_conv

DIT_PREFIX = "model.diffusion_model."


def _dict_literal(func, name: str) -> dict[str, str]:
    """The dict literal assigned to `name` inside `func` (first assignment)."""
    tree = ast.parse(inspect.getsource(func))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"{func.__name__} has no {name} literal")


@functools.cache
def _dit_tables() -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    rename = _dict_literal(_dit_conv.FluxDiTStateDictConverter, "rename_dict")
    suffix = _dict_literal(_dit_conv.FluxDiTStateDictConverter, "suffix_rename_dict")
    inverse = {v: k for k, v in rename.items()}
    # Double blocks use the img_/txt_ suffixes; single blocks the others.
    double = {v: k for k, v in suffix.items() if k.startswith(("img_", "txt_"))}
    single = {v: k for k, v in suffix.items() if not k.startswith(("img_", "txt_"))}
    return inverse, double, single


def dit_to_bfl(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DiffSynth FluxDiT names -> BFL flux1-dev names (with the ComfyUI-style prefix majicflus uses)."""
    inverse, double, single = _dit_tables()
    out = {}
    for name, tensor in state_dict.items():
        if name in inverse:
            new = inverse[name]
        else:
            kind, index, rest = name.split(".", 2)
            if kind == "blocks":
                new = f"double_blocks.{index}.{double[rest]}"
            elif kind == "single_blocks":
                new = f"single_blocks.{index}.{single[rest]}"
            else:
                raise KeyError(f"no BFL name for DiT parameter {name}")
        out[DIT_PREFIX + new] = tensor
    return out


_CLIP_LAYER = {
    "attn.to_q": "self_attn.q_proj",
    "attn.to_k": "self_attn.k_proj",
    "attn.to_v": "self_attn.v_proj",
    "attn.to_out": "self_attn.out_proj",
    "layer_norm1": "layer_norm1",
    "layer_norm2": "layer_norm2",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}


def clip_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DiffSynth FluxTextEncoderClip names -> transformers CLIPTextModel names."""
    out = {}
    for name, tensor in state_dict.items():
        if name == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = tensor
        elif name == "position_embeds":
            out["text_model.embeddings.position_embedding.weight"] = tensor.reshape(tensor.shape[-2:])
        elif name.startswith("final_layer_norm."):
            out["text_model." + name] = tensor
        else:
            m = re.fullmatch(r"encoders\.(\d+)\.(.+)\.(weight|bias)", name)
            if not m:
                raise KeyError(f"no transformers name for CLIP parameter {name}")
            out[f"text_model.encoder.layers.{m[1]}.{_CLIP_LAYER[m[2]]}.{m[3]}"] = tensor
    return out


def t5_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FluxTextEncoderT5 is a T5EncoderModel; the file omits the tied embed_tokens copy."""
    return {k: v for k, v in state_dict.items() if k != "encoder.embed_tokens.weight"}


@functools.cache
def _vae_tables() -> tuple[dict[str, str], dict[str, str]]:
    enc = _dict_literal(_vae_conv.FluxVAEEncoderStateDictConverter, "rename_dict")
    dec = _dict_literal(_vae_conv.FluxVAEDecoderStateDictConverter, "rename_dict")
    return {v: k for k, v in enc.items()}, {v: k for k, v in dec.items()}


def vae_to_bfl(encoder: dict[str, torch.Tensor], decoder: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DiffSynth FluxVAEEncoder/Decoder names -> one BFL `ae.safetensors` state dict."""
    enc_inv, dec_inv = _vae_tables()
    out = {}
    for table, sd, what in ((enc_inv, encoder, "encoder"), (dec_inv, decoder, "decoder")):
        for name, tensor in sd.items():
            if name not in table:
                raise KeyError(f"no BFL name for VAE {what} parameter {name}")
            out[table[name]] = tensor
    return out
