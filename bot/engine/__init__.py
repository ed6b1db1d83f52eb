"""Generation engine: FLUX (majicflus) on DiffSynth, float8 DiT, bf16 encoders and VAE, CPU offload."""
