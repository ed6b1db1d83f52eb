"""Where the model files live, which are missing, and how to fetch them (through modelscope).

Layout under `model.dir` mirrors modelscope's `local_dir=<dir>/<model_id>`:

    MAILAND/majicflus_v1/majicflus_v134.safetensors
    black-forest-labs/FLUX.1-dev/ae.safetensors
    black-forest-labs/FLUX.1-dev/text_encoder/model.safetensors
    black-forest-labs/FLUX.1-dev/text_encoder_2/*.safetensors
    black-forest-labs/FLUX.1-dev/tokenizer/      black-forest-labs/FLUX.1-dev/tokenizer_2/

The tiny preset uses the same layout under `<dir>/tiny-random/`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("fluxbot.engine.weights")

DIT_REPO = "MAILAND/majicflus_v1"
DIT_FILE = f"{DIT_REPO}/majicflus_v134.safetensors"
FLUX_REPO = "black-forest-labs/FLUX.1-dev"
FLUX_DIR = FLUX_REPO
TINY_SUBDIR = "tiny-random"

# What `fluxbot download` asks modelscope for, per repository.
DOWNLOADS: dict[str, list[str]] = {
    DIT_REPO: ["majicflus_v134.safetensors"],
    FLUX_REPO: [
        "ae.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder_2/*",
        "tokenizer/*",
        "tokenizer_2/*",
    ],
}


class MissingWeightsError(RuntimeError):
    """Model files are missing; the message names each one and the command that fetches them."""

    def __init__(self, root: Path, missing: list[str], config_hint: str = ""):
        self.root = root
        self.missing = missing
        lines = "\n".join(f"  - {root / m}" for m in missing)
        cfg = f" --config {config_hint}" if config_hint else ""
        super().__init__(
            f"model files are missing under {root}:\n{lines}\n"
            f"Fetch them with:  fluxbot download{cfg}\n"
            f'(or set [model] preset = "tiny-random" for a no-download smoke test)'
        )


@dataclass(frozen=True)
class ModelFiles:
    root: Path
    dit: Path
    vae: Path
    clip: Path
    t5: tuple[Path, ...]
    tokenizer: Path
    tokenizer_2: Path


def model_files(root: Path) -> ModelFiles:
    flux = root / FLUX_DIR
    return ModelFiles(
        root=root,
        dit=root / DIT_FILE,
        vae=flux / "ae.safetensors",
        clip=flux / "text_encoder" / "model.safetensors",
        t5=tuple(sorted((flux / "text_encoder_2").glob("*.safetensors"))),
        tokenizer=flux / "tokenizer",
        tokenizer_2=flux / "tokenizer_2",
    )


def missing_files(root: Path) -> list[str]:
    """Relative paths of required files that are absent (empty list: all present)."""
    root = Path(root)
    files = model_files(root)
    missing = []
    for path in (files.dit, files.vae, files.clip):
        if not path.is_file() or path.stat().st_size == 0:
            missing.append(str(path.relative_to(root)))
    if not files.t5:
        missing.append(f"{FLUX_DIR}/text_encoder_2/*.safetensors")
    if not any(files.tokenizer.glob("vocab.json")) and not any(files.tokenizer.glob("tokenizer.json")):
        missing.append(f"{FLUX_DIR}/tokenizer/ (vocab.json, merges.txt)")
    if not any(files.tokenizer_2.glob("tokenizer.json")) and not any(files.tokenizer_2.glob("spiece.model")):
        missing.append(f"{FLUX_DIR}/tokenizer_2/ (tokenizer.json or spiece.model)")
    return missing


def preset_root(preset: str, model_dir: Path) -> Path:
    return Path(model_dir) / TINY_SUBDIR if preset == "tiny-random" else Path(model_dir)


def require(preset: str, model_dir: Path, config_hint: str = "") -> Path:
    """The preset's weight folder; raises MissingWeightsError naming every absent file.
    The tiny-random preset is written on first use, so it is never missing."""
    root = preset_root(preset, model_dir)
    if preset != "tiny-random":
        missing = missing_files(root)
        if missing:
            raise MissingWeightsError(root, missing, config_hint)
    return root


def download(model_dir: Path, *, snapshot_download=None) -> list[str]:
    """Fetch exactly the needed files through modelscope into `model_dir`.

    modelscope skips files already complete and resumes partial ones, so this is safe to re-run.
    Returns the files still missing afterwards (empty on success).
    """
    if snapshot_download is None:
        import modelscope

        snapshot_download = modelscope.snapshot_download
    model_dir = Path(model_dir)
    for repo, patterns in DOWNLOADS.items():
        log.info("fetching %s (%s) into %s", repo, ", ".join(patterns), model_dir / repo)
        snapshot_download(repo, local_dir=str(model_dir / repo), allow_file_pattern=patterns)
    return missing_files(model_dir)
