"""Reproduce a published gFID in one command: convert a released checkpoint (LlamaGen, xAR, VAR),
sample 50,000 images on every GPU of the machine, resize as the paper did, score against the
ADM reference batch, and append a row with its provenance to a results table.

    python reproduce.py --config configs/reproduce/llamagen-XL.yaml \
        ckpt=pretrained_models/c2i_XL_384.pt tokenizer_ckpt=pretrained_models/vq_ds16_c2i.pt \
        ref=VIRTUAL_imagenet256_labeled.npz
    python reproduce.py --config configs/reproduce/xar-B.yaml \
        ckpt=pretrained_models/xAR-B.pth tokenizer_ckpt=pretrained_models/kl16.ckpt \
        ref=VIRTUAL_imagenet256_labeled.npz
    python reproduce.py --config configs/reproduce/var-d16.yaml \
        ckpt=pretrained_models/var_d16.pth tokenizer_ckpt=pretrained_models/vae_ch160v4096z32.pth \
        ref=VIRTUAL_imagenet256_labeled.npz
    # -> runs/reproduce/LlamaGen-XL/{weights/, samples/, samples_256.npz, metrics.json}
    #    and one more row in results/reproduce.md
    # class-balanced labels (50 per class) instead of LlamaGen's random ones:
    python reproduce.py --config configs/reproduce/llamagen-B.yaml ... labels=balanced \
        out=runs/reproduce/LlamaGen-B-balanced

Stages; re-running the same command resumes where it stopped:
  1. convert  family=llamagen: convert.llamagen vq + gpt -> OUT/weights/{tokenizer,generator}
              .safetensors; family=xar: convert.mar_vae + convert.xar; family=var: convert.var
              vqvae + var (a generator of another size than the config's `size` is refused).
              Kept while the sources are unchanged.
  2. sample   sample.py mode=images -> OUT/samples/shard_*/ PNGs. One process per visible GPU
              (torchrun) when there are several, or nproc=N; finished shards are never redone
              and image i depends only on (seed, i), not on the number of processes. Guidance
              follows the release: LlamaGen guides only when cfg_scale > 1 (below 1: unguided).
  3. pack     shards in index order -> OUT/samples_{eval_size}.npz (arr_0 uint8 NHWC, arr_1
              labels), bicubic-resized to eval_size when the generation resolution differs
              (LlamaGen: 384 -> 256), streamed, so 50k images never sit in memory at once
  4. score    evaluation.score against ref -> OUT/metrics.json, then the row in `table`.
Re-running a finished run keeps its metrics.json and adds no second row (new samples, another
reference or another Inception network score again and add one). Several machines: run sample.py
under a multi-node torchrun with the settings in OUT/samples/settings.json on a shared folder,
then re-run this command: it finds every shard done, packs and scores.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import List

import numpy as np
import torch
import torch.nn.functional as F

from common import precision
from common.config import ConfigError, check_fields, load_config, run_cli
from common.dist import get_logger, pick_device
from common.io import atomic_write_text, sha256_file
from common.precision import PRECISIONS
from convert import mar_vae
from convert.llamagen import LAYOUTS, GPTConvertConfig, VQConvertConfig, convert_gpt, convert_vq
from convert.var_transformer import VARConvertConfig, convert_var
from convert.var_vqvae import VQVAEConvertConfig, convert_vqvae
from convert.xar import XARConvertConfig, convert_xar
from dataset.images import to_uint8
from evaluation import METRICS, InceptionExtractor, load_reference, resolve_weights, score, summary_line
from evaluation.inputs import open_images
from evaluation.score import kept_result, score_settings
from sampling.settings import SamplingConfig
from sampling.generate import SAMPLERS
from sampling.speculative import SpeculativeConfig
from sampling import run as sampling_run
from sampling.outputs import pack_npz, shard_done

ROOT = Path(__file__).resolve().parent


# the settings' allowed values; num_images >= 2: FID estimates a covariance
RANGES = {"family": ("llamagen", "xar", "var"),
          "size": ("", "xAR-B", "xAR-L", "xAR-H", "VAR-d16", "VAR-d20", "VAR-d24", "VAR-d30"),
          "labels": ("random", "balanced"), "layout": tuple(LAYOUTS),
          "precision": PRECISIONS, "device": ("auto", "cpu", "cuda"),
          "image_size": ">= 1", "eval_size": ">= 1", "num_images": ">= 2", "batch_size": ">= 1",
          "shard_size": ">= 1", "nproc": ">= 0", "published_fid": ">= 0", "sampler": tuple(SAMPLERS)}


@dataclass
class ReproduceConfig:
    name: str = "???"  # the run's label in the table, e.g. LlamaGen-XL
    family: str = "llamagen"  # whose release: llamagen (GPT + VQ) | xar (xAR + MAR's KL-16 VAE) | var (VAR + its multi-scale VQVAE)
    ckpt: str = "???"  # generator checkpoint: LlamaGen c2i_*.pt (or a folder with consolidated.pth) | xAR-{B,L,H}.pth | var_d{16,20,24,30}.pth
    tokenizer_ckpt: str = "???"  # its tokenizer: LlamaGen vq_ds16_c2i.pt | MAR's kl16.ckpt | VAR's vae_ch160v4096z32.pth
    size: str = ""  # xar, var: the generator size the config is for (xAR-B ... | VAR-d16 ...); another is refused
    patch_nums: List[int] = field(default_factory=list)  # var: the VQVAE's scale schedule; empty: the 256px release's
    ref: str = "???"  # reference batch .npz (ADM's VIRTUAL_imagenet256_labeled.npz)
    out: str = ""  # working folder; empty: runs/reproduce/NAME
    table: str = "results/reproduce.md"  # markdown table a row is appended to
    image_size: int = 256  # generation resolution: the checkpoint's (256 or 384)
    eval_size: int = 256  # side the images are scored at; bicubic resize when it differs
    layout: str = "auto"  # llamagen: GPT checkpoint layout: auto | ddp | fsdp | deepspeed
    n_head: int = 0  # llamagen: attention heads of a GPT outside LlamaGen's size table; 0: from the table
    num_classes: int = 0  # llamagen: classes, where neither the file's args nor a 1001-row table tell
    use_ema: bool = False  # convert the checkpoint's EMA weights ("ema" | "model_ema"; the released files are what their evals use)
    num_images: int = 50000  # images to generate and score
    labels: str = "random"  # random (LlamaGen: uniform random classes) | balanced (N/classes each)
    seed: int = 0  # image i's noise and random label depend only on (seed, i)
    batch_size: int = 64  # images per process per forward pass (CFG doubles the rows)
    shard_size: int = 500  # images per shard, the unit of resumption
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # guidance and filtering; llamagen: guided only when cfg_scale > 1, as its code (below 1 runs as 1)
    sampler: str = "plain"  # plain | sjd | coupled (lossless) | gsd (lossy): speculative decoding (llamagen; xar and var need plain)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)  # the speculative samplers' window, draft init and gsd group
    precision: str = "auto"  # sampling: auto (bf16 where native: GPUs as LlamaGen, CPUs with AVX512-BF16/AMX) | bf16 | fp32
    compile: bool = False  # compile the decode step into a CUDA graph (GPU; faster for 50k images)
    device: str = "auto"  # auto | cpu | cuda, for sampling and scoring
    nproc: int = 0  # sampling processes; 0: one per visible GPU (1 without a GPU)
    metrics: List[str] = field(default_factory=lambda: list(METRICS))  # any of fid sfid is pr kid
    inception_weights: str = ""  # evaluator weights; empty: $ARGEN_INCEPTION_WEIGHTS, then the cache
    published_fid: float = 0.0  # the paper's number, shown beside ours in the table (0: none)

    def validate(self) -> None:
        check_fields(self, "", RANGES)
        bad = sorted(set(self.metrics) - set(METRICS))
        if bad:
            raise ConfigError(f"metrics: unknown {bad}; choose from {list(METRICS)}")
        if not self.metrics:
            raise ConfigError(f"metrics=[] asks for nothing; choose some of {list(METRICS)}")
        self.speculative.validate()
        if self.family != "llamagen" and self.sampler != "plain":
            raise ConfigError(f"sampler={self.sampler}: speculative decoding verifies drafted "
                              f"tokens of next-token and next-group models; family={self.family} "
                              f"models need sampler=plain")
        if self.family == "var" and self.use_ema:
            raise ConfigError("use_ema=true: VAR's checkpoints hold one set of weights (no EMA); "
                              "leave it false")


# ----------------------------------------------------------------------------- sampling

def follow_release(cfg: ReproduceConfig, log) -> ReproduceConfig:
    """The settings as the release's own sampler applies them. argen guides whenever cfg_scale
    != 1, below 1 toward the null class (sampling/guidance.py), as xAR's and VAR's samplers do;
    LlamaGen's sample_c2i / generate double the batch only when cfg_scale > 1, so there a
    scale below 1 samples unguided: argen's cfg_scale=1, which is then what runs and is recorded."""
    s = cfg.sampling
    if cfg.family != "llamagen" or s.cfg_scale >= 1.0:
        return cfg
    log.info(f"sampling.cfg_scale={s.cfg_scale:g}: LlamaGen guides only above 1, so its code samples "
             f"these unguided; so do we (cfg_scale=1 in the settings, the table and metrics.json)")
    return replace(cfg, sampling=replace(s, cfg_scale=1.0))


def sample_overrides(cfg: ReproduceConfig, weights: Path, folder: Path) -> list[str]:
    """sample.py's key=value arguments; the tokenizer comes from the weights (sha256-checked)."""
    return [f"weights={weights}", f"out={folder}", "mode=images", f"num_images={cfg.num_images}",
            f"labels={cfg.labels}", f"seed={cfg.seed}", f"batch_size={cfg.batch_size}",
            f"shard_size={cfg.shard_size}", "npz=false", f"device={cfg.device}",
            f"precision={cfg.precision}", f"compile={str(cfg.compile).lower()}"] + \
        [f"sampling.{k}={v}" for k, v in asdict(cfg.sampling).items()] + [f"sampler={cfg.sampler}"] + \
        [f"speculative.{k}={v}" for k, v in asdict(cfg.speculative).items()]


def sample_command(nproc: int, overrides: list[str]) -> list[str]:
    launcher = [sys.executable]
    if nproc > 1:  # torchrun, spelled as a module so it is this interpreter's
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return launcher + [str(ROOT / "sample.py")] + overrides


def process_count(cfg: ReproduceConfig) -> int:
    if cfg.nproc > 0:
        return cfg.nproc
    return max(1, torch.cuda.device_count()) if cfg.device != "cpu" else 1


def run_sampling(cfg: ReproduceConfig, weights: Path, folder: Path, nproc: int, log) -> None:
    overrides = sample_overrides(cfg, weights, folder)
    sample_cfg = load_config(sampling_run.SampleRunConfig, overrides=overrides)
    # refuses shards made with other settings
    sampling_run.check_out_folder(sample_cfg, folder, pick_device(cfg.device))
    todo = [k for k in range(-(-cfg.num_images // cfg.shard_size)) if not shard_done(folder, k)]
    if not todo:
        log.info(f"{folder}: all {cfg.num_images} images already sampled")
        return
    log.info(f"sampling {len(todo)} shards of {cfg.shard_size} into {folder} with {nproc} process(es)")
    if nproc == 1:
        sampling_run.run(sample_cfg)
        return
    proc = subprocess.run(sample_command(nproc, overrides), cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"sampling stopped (exit code {proc.returncode}); finished shards in "
                           f"{folder} are kept: re-run the same command to resume")


# ----------------------------------------------------------------------------- packing

def resize_bicubic(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (B, H, W, 3) -> (B, size, size, 3) as LlamaGen's sampler resizes 384 -> 256:
    F.interpolate bicubic (align_corners=False, no antialias) on [-1, 1] values, then clamp and
    round. LlamaGen resizes the decoder's float output; we resize the stored uint8 PNGs, which
    adds one rounding of at most half a level before the resize."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (B, 3, H, W)
    return to_uint8(F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False))


def pack_for_eval(folder: Path, num_images: int, shard_size: int, size: int, path: Path,
                  progress: bool = True) -> Path:
    """Stream the shards, in index order, into an ADM .npz of size x size images."""
    num_shards = -(-num_images // shard_size)
    missing = [k for k in range(num_shards) if not shard_done(folder, k)]
    if missing:
        raise RuntimeError(f"{folder}: shards {missing[:5]} are unfinished; re-run to resume sampling")

    def to_size(batch: np.ndarray) -> np.ndarray:
        return batch if batch.shape[1:3] == (size, size) else resize_bicubic(batch, size)

    pack_npz(folder, num_shards, path, expected=num_images, transform=to_size, progress=progress)
    return path


# ----------------------------------------------------------------------------- provenance

def _stored_source(weights: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("source", "{}"))


def _argen_version() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _devices(cfg: ReproduceConfig, nproc: int) -> str:
    if cfg.device != "cpu" and torch.cuda.is_available():
        return f"{nproc}x {torch.cuda.get_device_name(0)}"
    return f"{nproc}x CPU"


def _precision(cfg: ReproduceConfig) -> str:
    """What sample.py's precision resolved to on the device it sampled on."""
    return precision.resolved(cfg.precision, pick_device(cfg.device))


TABLE_HEADER = [
    "| date (UTC) | run | checkpoint (sha256) | res | cfg | labels | images | FID | sFID | IS | "
    "Prec | Rec | paper FID | Inception | reference (sha256) | devices | argen | settings |",
    "|" + "---|" * 18,
]


def table_row(cfg: ReproduceConfig, result: dict, prov: dict) -> str:
    m = result["metrics"]

    def num(value, spec):
        return "n/a" if value is None else format(value, spec)

    s = cfg.sampling
    draws = (f"{s.flow_sampler.upper()} {s.flow_steps} steps" if cfg.family == "xar" else
             f"top-k {s.top_k}, top-p {s.top_p}, T {s.temperature}")
    sampler = "" if cfg.sampler == "plain" else f", {cfg.sampler} window {cfg.speculative.window}"
    settings = (f"{draws}, {s.cfg_schedule} CFG{sampler}, seed {cfg.seed}, {prov['precision']}"
                + (", EMA" if cfg.use_ema else ""))
    res = f"{cfg.image_size}" + (f"→{cfg.eval_size} bicubic" if cfg.image_size != cfg.eval_size else "")
    cells = [prov["date"][:16].replace("T", " "), cfg.name,
             f"{prov['checkpoint']['file']} ({prov['checkpoint']['sha256'][:12]})", res,
             f"{s.cfg_scale:g}", cfg.labels, f"{result['samples']['count']:,}",
             num(m.get("fid"), ".3f"), num(m.get("sfid"), ".3f"),
             num(m.get("is") and m["is"]["mean"], ".1f"), num(m.get("precision"), ".3f"),
             num(m.get("recall"), ".3f"), f"{cfg.published_fid:g}" if cfg.published_fid else "",
             result["inception"]["fingerprint"][:12],
             f"{Path(result['reference']['path']).name} ({result['reference']['sha256'][:12]})",
             prov["devices"], prov["argen"], settings]
    return "| " + " | ".join(cells) + " |"


def append_row(table: Path, row: str) -> None:
    old = table.read_text() if table.is_file() else "\n".join(TABLE_HEADER) + "\n"
    atomic_write_text(table, old + row + "\n")


# ----------------------------------------------------------------------------- main

def convert_release(cfg: ReproduceConfig, folder: Path) -> tuple[Path, Path]:
    """(generator, tokenizer) argen weights converted from the release's files (kept when
    up to date)."""
    gen_out, tok_out = str(folder / "generator.safetensors"), str(folder / "tokenizer.safetensors")
    if cfg.family == "var":
        tok = convert_vqvae(VQVAEConvertConfig(ckpt=cfg.tokenizer_ckpt, out=tok_out,
                                               **({"patch_nums": cfg.patch_nums} if cfg.patch_nums else {})),
                            reuse=True)
        gen = convert_var(VARConvertConfig(ckpt=cfg.ckpt, out=gen_out, tokenizer=str(tok), size=cfg.size),
                          reuse=True)
        return gen, tok
    if cfg.family == "xar":
        tok = mar_vae.convert(mar_vae.MarVAEConvertConfig(ckpt=cfg.tokenizer_ckpt, out=tok_out), reuse=True)
        gen = convert_xar(XARConvertConfig(ckpt=cfg.ckpt, out=gen_out, tokenizer=str(tok), size=cfg.size,
                                           use_ema=cfg.use_ema), reuse=True)
        return gen, tok
    tok = convert_vq(VQConvertConfig(ckpt=cfg.tokenizer_ckpt, out=tok_out), reuse=True)
    gen = convert_gpt(GPTConvertConfig(ckpt=cfg.ckpt, out=gen_out, image_size=cfg.image_size,
                                       tokenizer=str(tok), layout=cfg.layout, use_ema=cfg.use_ema,
                                       n_head=cfg.n_head, num_classes=cfg.num_classes),
                      reuse=True)
    return gen, tok


def main(cfg: ReproduceConfig, extractor: InceptionExtractor | None = None) -> dict:
    """Run every stage; `extractor` lets a caller (tests) reuse a loaded Inception network."""
    log = get_logger("reproduce")
    cfg = follow_release(cfg, log)
    out = Path(cfg.out or f"runs/reproduce/{cfg.name}")
    # fail now, not after hours of sampling: the reference and the evaluator must be there
    load_reference(cfg.ref)
    if extractor is None:
        resolve_weights(cfg.inception_weights or None)
    gen, vq = convert_release(cfg, out / "weights")
    nproc = process_count(cfg)
    run_sampling(cfg, gen, out / "samples", nproc, log)
    npz = out / f"samples_{cfg.eval_size}.npz"
    stamp = {"settings": json.loads((out / "samples" / "settings.json").read_text()),
             "eval_size": cfg.eval_size}
    stamp_path = npz.with_suffix(".json")
    if not (npz.is_file() and stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp):
        pack_for_eval(out / "samples", cfg.num_images, cfg.shard_size, cfg.eval_size, npz)
        atomic_write_text(stamp_path, json.dumps(stamp, indent=2))
    extractor = extractor or InceptionExtractor(cfg.inception_weights or None, cfg.device)
    source, ref = open_images(npz), load_reference(cfg.ref)
    # score()'s defaults, which the table's protocol uses: a re-run with the same samples,
    # reference and network keeps metrics.json and adds no second row for the same numbers
    settings = score_settings(cfg.metrics, batch_size=64, seed=2020, num_expected=50000,
                              kid_subset_size=1000, allow_lossy=False)
    kept = kept_result(out / "metrics.json", {"samples": source.describe(), "settings": settings,
                                              "reference": ref.describe(),
                                              "inception": vars(extractor.info)})
    if kept is not None:
        print(summary_line(kept) + f"  -> {out / 'metrics.json'} (kept: same samples, reference "
                                   f"and network; its row is already in {cfg.table})")
        return kept
    result = score(source, ref, metrics=cfg.metrics, extractor=extractor, num_expected=50000)
    prov = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "checkpoint": _stored_source(gen), "tokenizer_checkpoint": _stored_source(vq),
            "weights_sha256": {"generator": sha256_file(gen), "tokenizer": sha256_file(vq)},
            "devices": _devices(cfg, nproc), "processes": nproc, "argen": _argen_version(),
            "precision": _precision(cfg),
            "resize": (f"bicubic {cfg.image_size} -> {cfg.eval_size}"
                       if cfg.image_size != cfg.eval_size else "none")}
    result["reproduce"] = {**prov, "config": asdict(cfg)}
    record = out / "samples" / "sampler.json"  # the rule, window, forward passes, accepted length
    result["sampler"] = json.loads(record.read_text()) if record.is_file() else {"sampler": cfg.sampler}
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2) + "\n")
    append_row(Path(cfg.table), table_row(cfg, result, prov))
    print(summary_line(result) + f"  -> {out / 'metrics.json'}, row added to {cfg.table}")
    return result


if __name__ == "__main__":
    run_cli(main, ReproduceConfig, doc=__doc__)
