"""Write full-size FLUX models with random weights in the real on-disk layout.

Speed and memory do not depend on weight values, so benchmarks run on these instead of the
real download (22 GB written here). Keys and shapes match the real files (tests/test_engine.py checks the
hashes against DiffSynth's registry), so the real loader runs. Tokenizers are the tiny ones:
only token ids matter for speed and T5 always sees 512 padded tokens.

    python benchmarks/random_weights.py OUT_DIR            # on a GPU machine (fills on the GPU)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot.engine import layouts, tiny, weights


@torch.no_grad()
def _random(module: torch.nn.Module, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    gen = torch.Generator(device).manual_seed(0)
    for name, p in module.state_dict().items():
        t = torch.empty(p.shape, device=device, dtype=torch.float32)
        if p.dim() == 1:
            t.normal_(0, 0.02, generator=gen) if not name.endswith("weight") else t.fill_(1.0)
        else:
            t.normal_(0, 1.0 / max(1, p[0].numel()) ** 0.5, generator=gen)
        out[name] = t.to(dtype)
    return out


def _save(sd: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in sd.items()}, str(path))


def write_full_size(root: Path, device: str = "cuda") -> Path:
    from diffsynth.models.flux_dit import FluxDiT
    from diffsynth.models.flux_text_encoder_clip import FluxTextEncoderClip
    from diffsynth.models.flux_text_encoder_t5 import FluxTextEncoderT5
    from diffsynth.models.flux_vae import FluxVAEDecoder, FluxVAEEncoder

    root = Path(root)
    if not weights.missing_files(root):
        return root
    files = weights.model_files(root)
    flux = root / weights.FLUX_DIR
    t0 = time.perf_counter()
    with torch.device("meta"):
        dit, clip, t5 = FluxDiT(), FluxTextEncoderClip(), FluxTextEncoderT5()
        enc, dec = FluxVAEEncoder(), FluxVAEDecoder()
    # The DiT file is written in float8 (as the article stores it); the loader reads it either way.
    _save(layouts.dit_to_bfl(_random(dit, device, torch.float8_e4m3fn)), files.dit)
    torch.cuda.empty_cache() if device == "cuda" else None
    _save(layouts.clip_to_transformers(_random(clip, device, torch.bfloat16)), flux / "text_encoder/model.safetensors")
    t5_sd = layouts.t5_to_transformers(_random(t5, device, torch.bfloat16))
    keys = sorted(t5_sd)
    half = len(keys) // 2
    _save({k: t5_sd[k] for k in keys[:half]}, flux / "text_encoder_2/model-00001-of-00002.safetensors")
    _save({k: t5_sd[k] for k in keys[half:]}, flux / "text_encoder_2/model-00002-of-00002.safetensors")
    del t5_sd
    _save(
        layouts.vae_to_bfl(_random(enc, device, torch.bfloat16), _random(dec, device, torch.bfloat16)),
        flux / "ae.safetensors",
    )
    # tokenizers: the tiny ones
    tiny._write_clip_tokenizer(flux / "tokenizer")
    tiny._write_t5_tokenizer(flux / "tokenizer_2")
    # Write the 22 GB back to disk before anything is timed: while the kernel was still doing it,
    # the 8 GB benchmark (it streams weights from host memory every step) ran 3.9 s an image
    # instead of 2.9-3.0 (gpu51).
    os.sync()
    print(f"wrote full-size random weights to {root} in {time.perf_counter() - t0:.1f} s", flush=True)
    return root


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    write_full_size(args.out, args.device)
