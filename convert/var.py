"""Convert VAR's released checkpoints (FoundationVision/VAR) into argen weights.

    # the multi-scale VQVAE (vae_ch160v4096z32.pth), with the 256px scale schedule
    python -m convert.var vqvae vae_ch160v4096z32.pth weights/var/vae_ch160v4096z32.safetensors
    # another schedule of the same scale count (the 512px models)
    python -m convert.var vqvae vae_ch160v4096z32.pth out=... patch_nums=[1,2,3,4,6,9,13,18,24,32]
    # a transformer, with the converted VQVAE (its quantiser builds the next-scale inputs)
    python -m convert.var var var_d16.pth weights/var/var_d16.safetensors \
        tokenizer=weights/var/vae_ch160v4096z32.safetensors [size=VAR-d16]
    python sample.py weights=weights/var/var_d16.safetensors out=grid.png \
        sampling.cfg_scale=2.5 sampling.cfg_schedule=linear_full sampling.top_k=900 sampling.top_p=0.96

The first word picks the converter; the checkpoint path may come next or as ckpt=..., then out;
the rest is key=value (`python -m convert.var var --help` lists the keys). VAR's guidance
weight c ramps linearly from 0 at the first scale to c at the last, logits (1 + t) cond - t
uncond: that is argen's cfg_scale = 1 + c with cfg_schedule=linear_full (VAR's cfg 1.5 is
cfg_scale 2.5; VAR's cfg 1 still guides).

The VQVAE's layout and key table: convert/var_vqvae.py; the transformer's: convert/var_transformer.py.
"""

from __future__ import annotations

from pathlib import Path

from convert.common import run_commands
from convert.var_transformer import VARConvertConfig, convert_var
from convert.var_vqvae import VQVAEConvertConfig, convert_vqvae

COMMANDS = {"vqvae": (VQVAEConvertConfig, convert_vqvae), "var": (VARConvertConfig, convert_var)}


def main(argv: list[str] | None = None) -> Path:
    return run_commands(COMMANDS, __doc__, argv)  # any error: one line naming what to fix


if __name__ == "__main__":
    main()
