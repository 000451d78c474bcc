"""Sample from exported generator weights: a labelled grid, or N images for FID.

    # a grid, one row per class
    python sample.py weights=runs/quickstart/gen/weights/ema.safetensors out=grid.png
    # 50,000 images as PNG shards + an ADM-layout .npz, over all GPUs of a machine
    torchrun --nproc_per_node=8 sample.py --config configs/sample/fid50k.yaml \
        weights=RUN/weights/ema.safetensors out=samples/RUN sampling.cfg_scale=2.0
    # speculative decoding (next-token and next-group models): sjd | coupled (lossless), gsd (lossy)
    python sample.py weights=... out=grid.png sampler=coupled speculative.window=16 speculative.init=above

Image i is generated with noise keyed by (seed, i) and gets label i % classes (balanced) or a
label hashed from (seed, i) (random), so the images do not depend on the number of processes
or the batch size. Finished shards are kept: re-running the command resumes.
"""

from __future__ import annotations

from common.config import check_paths, run_cli
from sampling.run import SampleRunConfig, run


def main(cfg: SampleRunConfig) -> None:
    check_paths(cfg, {"weights": "export them with train_gen.py or convert a released checkpoint",
                      "tokenizer": "pass the tokenizer weights the generator was trained on"})
    run(cfg)


if __name__ == "__main__":
    run_cli(main, SampleRunConfig, __doc__)
