"""Training throughput and peak memory: lookalike's training step vs the official IP-Adapter loop, side by side.

The official loop is re-implemented here with the structure of tencent-ailab/IP-Adapter ``tutorial_train.py``:
every step opens and transforms the images, runs the VAE, the CLIP image encoder and the text encoder, then the
UNet with the adapter (image tokens concatenated to the text tokens, split again in every cross-attention).
lookalike runs its real ``train()`` loop: ``--cache`` encodes every sample once, then each step reads cached
rows and runs only the UNet and the adapter (no VAE, text or image encoder in memory).

Models: full-size SD1.5 (UNet 860M, VAE 84M, CLIP ViT-L text encoder 123M) and CLIP ViT-H/14 (632M) built
from their configs with random weights (seeded); a character-level tokenizer stands in for CLIP's BPE (same
77-token sequences). Data: DreamBench photos from ../shared when present, else generated images.
Each arm runs in its own process, so each peak RSS (``resource.getrusage`` ru_maxrss) is its own.

    python bench/train_throughput.py                # 256 px, batch 2, 1 warm-up + 3 timed steps per arm
    python bench/train_throughput.py --arms official,live   # lookalike without the cache (same work as official)
    python bench/train_throughput.py --base flux            # FLUX.1 at full width, fewer blocks (train_throughput_flux)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DREAMBENCH = ROOT.parent / "shared" / "data" / "dreambench"


# -- full-size models with random weights -----------------------------------------------------------------
def full_unet() -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8)


def full_encoders() -> dict[str, Any]:
    """SD1.5's VAE and text encoder, CLIP ViT-H/14 with projection (random weights)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                        sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu"))
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
        patch_size=14, projection_dim=1024, hidden_act="gelu"))
    return {"vae": vae.eval(), "text": text.eval(), "vision": vision.eval()}


def scheduler() -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def write_data(folder: Path, count: int) -> Path:
    """A JSON list of ``count`` photos with captions (DreamBench when present)."""
    from PIL import Image

    photos = sorted(DREAMBENCH.glob("*/*.jpg"))[::3][:count] if DREAMBENCH.is_dir() else []
    records = []
    for i in range(count):
        path = folder / f"{i:03d}.jpg"
        if i < len(photos):
            path.write_bytes(photos[i].read_bytes())
            name = photos[i].parent.name.replace("_", " ")
        else:
            Image.effect_mandelbrot((512, 384), (-2, -1.2, 1, 1.2), 40 + i).convert("RGB").save(path)
            name = "fractal"
        records.append({"image_file": path.name, "text": f"a photo of a {name}"})
    data = folder / "data.json"
    data.write_text(json.dumps(records))
    return data


# -- the official loop (structure of tutorial_train.py) --------------------------------------------------------
class ImageProjModel(nn.Module):
    """The official basic projector: pooled embedding -> 4 tokens (linear + LayerNorm)."""

    def __init__(self, cross: int, embed: int, tokens: int = 4) -> None:
        super().__init__()
        self.tokens, self.cross = tokens, cross
        self.proj, self.norm = nn.Linear(embed, tokens * cross), nn.LayerNorm(cross)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(image_embeds).reshape(-1, self.tokens, self.cross))  # (B, T, C)


class IPAttnProcessor(nn.Module):
    """The official decoupled cross-attention: image tokens ride at the end of the text context, split off here."""

    def __init__(self, hidden: int, cross: int, tokens: int = 4) -> None:
        super().__init__()
        self.tokens = tokens
        self.to_k_ip, self.to_v_ip = nn.Linear(cross, hidden, bias=False), nn.Linear(cross, hidden, bias=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        b, heads = hidden_states.shape[0], attn.heads
        end = encoder_hidden_states.shape[1] - self.tokens
        text, ip = encoder_hidden_states[:, :end], encoder_hidden_states[:, end:]
        q = attn.to_q(hidden_states)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # (B, heads, L, d)

        out = F.scaled_dot_product_attention(split(q), split(attn.to_k(text)), split(attn.to_v(text)))
        ip_out = F.scaled_dot_product_attention(split(q), split(self.to_k_ip(ip)), split(self.to_v_ip(ip)))
        out = (out + ip_out).transpose(1, 2).reshape(b, -1, q.shape[-1])
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


class OfficialIPAdapter(nn.Module):
    """The official training wrapper: projector, UNet with the processors, image tokens appended to the text."""

    def __init__(self, unet: nn.Module, image_proj: nn.Module, adapter_modules: nn.ModuleList) -> None:
        super().__init__()
        self.unet, self.image_proj_model, self.adapter_modules = unet, image_proj, adapter_modules

    def forward(self, noisy_latents, timesteps, encoder_hidden_states, image_embeds):
        ip_tokens = self.image_proj_model(image_embeds)
        encoder_hidden_states = torch.cat([encoder_hidden_states, ip_tokens], dim=1)
        return self.unet(noisy_latents, timesteps, encoder_hidden_states).sample


def official_modules(unet: nn.Module) -> tuple[OfficialIPAdapter, list[nn.Parameter]]:
    """ImageProjModel + IPAttnProcessor on every cross-attention, to_k_ip/to_v_ip copied from to_k/to_v."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    procs: dict[str, Any] = {}
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        if name.endswith("attn1.processor"):
            procs[name] = AttnProcessor2_0()
        else:
            procs[name] = IPAttnProcessor(attn.to_k.out_features, unet.config.cross_attention_dim)
            procs[name].load_state_dict({"to_k_ip.weight": attn.to_k.weight, "to_v_ip.weight": attn.to_v.weight})
    unet.set_attn_processor(procs)
    adapter_modules = nn.ModuleList(p for p in unet.attn_processors.values() if isinstance(p, nn.Module))
    image_proj = ImageProjModel(unet.config.cross_attention_dim, 1024)
    params = [*image_proj.parameters(), *adapter_modules.parameters()]
    return OfficialIPAdapter(unet, image_proj, adapter_modules), params


class OfficialDataset:
    """tutorial_train.py's MyDataset: Resize + CenterCrop + Normalize for the VAE, CLIPImageProcessor, drops."""

    def __init__(self, data: Path, tokenizer: Any, size: int) -> None:
        from transformers import CLIPImageProcessor

        self.items = json.loads(data.read_text())
        self.root, self.tokenizer, self.size = data.parent, tokenizer, size
        self.clip = CLIPImageProcessor()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import random

        import numpy as np
        from PIL import Image

        item = self.items[i]
        raw = Image.open(self.root / item["image_file"])
        rgb = raw.convert("RGB")
        w, h = rgb.size
        s = self.size / min(w, h)
        small = rgb.resize((max(self.size, round(w * s)), max(self.size, round(h * s))), Image.Resampling.BILINEAR)
        left, top = (small.size[0] - self.size) // 2, (small.size[1] - self.size) // 2
        crop = np.asarray(small.crop((left, top, left + self.size, top + self.size)), dtype=np.float32)
        image = (torch.from_numpy(crop).permute(2, 0, 1) / 255.0 - 0.5) / 0.5
        clip_image = self.clip(images=raw, return_tensors="pt").pixel_values
        text, drop = item["text"], 0
        r = random.random()
        if r < 0.05:
            drop = 1
        elif r < 0.1:
            text = ""
        elif r < 0.15:
            text, drop = "", 1
        ids = self.tokenizer(text, max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids
        return {"image": image, "text_input_ids": ids, "clip_image": clip_image, "drop_image_embed": drop}


def collate(data: list[dict[str, Any]]) -> dict[str, Any]:
    return {"images": torch.stack([d["image"] for d in data]),
            "text_input_ids": torch.cat([d["text_input_ids"] for d in data]),
            "clip_images": torch.cat([d["clip_image"] for d in data]),
            "drop_image_embeds": [d["drop_image_embed"] for d in data]}


def run_official(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    """The official training loop, step for step (fp32, CPU, accelerate)."""
    import itertools

    from accelerate import Accelerator

    from lookalike.pipeline.tiny import tiny_tokenizer

    torch.manual_seed(0)
    unet, enc, noise_scheduler = full_unet().requires_grad_(False), full_encoders(), scheduler()
    for m in enc.values():
        m.requires_grad_(False)
    ip_adapter, params = official_modules(unet)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    loader = torch.utils.data.DataLoader(OfficialDataset(data, tiny_tokenizer(), args.resolution), shuffle=True,
                                         collate_fn=collate, batch_size=args.batch_size, num_workers=0)
    accelerator = Accelerator(cpu=True)
    ip_adapter, optimizer, loader = accelerator.prepare(ip_adapter, optimizer, loader)
    times, cpu, batches = [], [], itertools.cycle(loader)
    for _ in range(args.warmup + args.steps):
        began, began_cpu = time.perf_counter(), time.process_time()
        batch = next(batches)
        with accelerator.accumulate(ip_adapter):
            with torch.no_grad():
                latents = enc["vae"].encode(batch["images"]).latent_dist.sample() * enc["vae"].config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            with torch.no_grad():
                image_embeds = enc["vision"](batch["clip_images"]).image_embeds
            image_embeds = torch.stack([torch.zeros_like(e) if d else e
                                        for e, d in zip(image_embeds, batch["drop_image_embeds"])])
            with torch.no_grad():
                encoder_hidden_states = enc["text"](batch["text_input_ids"])[0]
            noise_pred = ip_adapter(noisy_latents, timesteps, encoder_hidden_states, image_embeds)
            loss = F.mse_loss(noise_pred.float(), noise.float(), reduction="mean")
            accelerator.gather(loss.repeat(args.batch_size)).mean().item()
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        times.append(time.perf_counter() - began)
        cpu.append(time.process_time() - began_cpu)
    return {"seconds": times[args.warmup:], "cpu_seconds": cpu[args.warmup:]}


# -- lookalike -----------------------------------------------------------------------------------------
def lookalike_models(with_encoders: bool) -> Any:
    """Frozen full-size models for lookalike's train(): the UNet alone when the cache replaces the encoders."""
    from lookalike.encoders.clip import ClipImageEncoder
    from lookalike.pipeline.tiny import tiny_tokenizer
    from lookalike.training.models import Models

    torch.manual_seed(0)
    unet = full_unet().requires_grad_(False).eval()
    parts: dict[str, Any] = {}
    if with_encoders:
        enc = full_encoders()
        parts = {"vae": enc["vae"].requires_grad_(False), "text_encoders": [enc["text"].requires_grad_(False)],
                 "image_encoder": ClipImageEncoder(enc["vision"], kinds=("pooled",))}
    return Models(family="sd15", unet=unet, noise_scheduler=scheduler(), tokenizers=[tiny_tokenizer()],
                  source="bench", **parts)


def run_lookalike(args: argparse.Namespace, data: Path, work: Path, mode: str) -> dict[str, Any]:
    """lookalike's train(): ``build`` (encode the cache once), ``cache`` (train from it) or ``live``."""
    from lookalike.training.config import TrainConfig
    from lookalike.training.loop import train

    config = TrainConfig(data=str(data), output=str(work / f"run-{mode}"), base="demo", adapter="ip-adapter_sd15",
                         steps=args.warmup + args.steps, batch_size=args.batch_size, resolution=args.resolution,
                         num_workers=0, num_validation=0, checkpoint_every=0, cpu=True,
                         cache=None if mode == "live" else str(work / "cache"), build_cache=mode == "build")
    models = lookalike_models(with_encoders=mode != "cache")
    began, began_cpu = time.perf_counter(), time.process_time()
    result = train(config, models=models)
    if mode == "build":
        return {"seconds": [time.perf_counter() - began], "cpu_seconds": [time.process_time() - began_cpu],
                "samples": len(json.loads(data.read_text()))}
    return {"seconds": result.seconds[args.warmup:], "cpu_seconds": result.cpu_seconds[args.warmup:]}


# -- driver ---------------------------------------------------------------------------------------------
ARMS = {"official": "official loop (tutorial_train.py structure)", "live": "lookalike, no cache",
        "build": "lookalike cache build (once)", "cache": "lookalike, --cache"}


def worker(args: argparse.Namespace) -> None:
    import diffusers  # noqa: F401  (imports first: the baseline is the RSS of a process ready to build models)
    import psutil
    import transformers  # noqa: F401

    import lookalike.training.loop  # noqa: F401

    torch.set_num_threads(args.threads)
    baseline = psutil.Process().memory_info().rss
    work = Path(args.work)
    data = work / "data" / "data.json"
    if args.base == "flux":
        from train_throughput_flux import run_flux_arm

        out = run_flux_arm(args, data, work, args.worker)
    elif args.worker == "official":
        out = run_official(args, data)
    else:
        out = run_lookalike(args, data, work, args.worker)
    out.update(peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, baseline_rss=baseline)
    Path(args.json_out).write_text(json.dumps(out))


def summarise(name: str, out: dict[str, Any], batch: int) -> dict[str, Any]:
    step, cpu = statistics.median(out["seconds"]), statistics.median(out["cpu_seconds"])
    samples = out.get("samples", batch)
    return {"arm": name, "step_s": step, "samples_per_s": samples / step, "samples_per_cpu_s": samples / cpu,
            "peak_rss_gb": out["peak_rss"] / 2**30, "peak_above_imports_gb": (out["peak_rss"] - out["baseline_rss"]) / 2**30,
            "steps": out["seconds"], "cpu_steps": out["cpu_seconds"]}


def run_arm(arm: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One arm in a fresh process (its own peak memory); its JSON summary."""
    out = work / f"{arm}.json"
    flags = ["--resolution", str(args.resolution), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
             "--warmup", str(args.warmup), "--threads", str(args.threads), "--worker", arm, "--work", str(work),
             "--json-out", str(out), "--base", args.base, "--double", str(args.double), "--single", str(args.single),
             "--t5-layers", str(args.t5_layers), "--max-sequence-length", str(args.max_sequence_length)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(ROOT.parent), str(ROOT / "bench"),
                                                        os.environ.get("PYTHONPATH", ""))),
           "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    done = subprocess.run([sys.executable, __file__, *flags], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the {arm} arm failed:\n{done.stderr[-4000:]}")
    label = "plain loop (encodes every step)" if arm == "official" and args.base == "flux" else ARMS[arm]
    return summarise(label, json.loads(out.read_text()), args.batch_size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per arm (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps per arm")
    p.add_argument("--threads", type=int, default=1, help="torch threads per arm (1: steady CPU-time figures)")
    p.add_argument("--arms", default="official,build,cache",
                   help="comma-separated, in order, from: " + ", ".join(ARMS) + " (live: lookalike without the cache)")
    p.add_argument("--base", choices=("sd15", "flux"), default="sd15", help="flux: FLUX.1 full width, flux-ip")
    p.add_argument("--double", type=int, default=1, help="FLUX double-stream blocks (19 in FLUX.1)")
    p.add_argument("--single", type=int, default=2, help="FLUX single-stream blocks (38 in FLUX.1)")
    p.add_argument("--t5-layers", type=int, default=2, help="T5 encoder layers at T5-XXL width (24 in FLUX.1)")
    p.add_argument("--max-sequence-length", type=int, default=128, help="FLUX T5 tokens (512 in FLUX.1-dev)")
    p.add_argument("--worker", choices=tuple(ARMS), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="lookalike-bench-") as tmp:
        work = Path(tmp)
        (work / "data").mkdir()
        write_data(work / "data", (args.warmup + args.steps) * args.batch_size)
        arms = [a for a in args.arms.split(",") if a]
        if "cache" in arms and "build" not in arms:
            arms.insert(arms.index("cache"), "build")  # the cache arm trains from what build wrote
        rows = {arm: run_arm(arm, args, work) for arm in arms}
    report(rows, args, (load, os.getloadavg()[0]))


def report(rows: dict[str, dict[str, Any]], args: argparse.Namespace, load: tuple[float, float]) -> None:
    model = ("SD1.5 full size" if args.base == "sd15" else f"FLUX.1 full width ({args.double} double + {args.single} "
             f"single blocks, T5-XXL width x{args.t5_layers} layers, {args.max_sequence_length} tokens), flux-ip")
    print(f"{model}, random weights, {args.resolution} px, batch {args.batch_size}, CPU ({os.cpu_count()} "
          f"cores, {args.threads} torch thread(s)); median of {args.steps} steps after {args.warmup} warm-up; "
          f"load average {load[0]:.1f} before, {load[1]:.1f} after")
    print(f"{'arm':44s} {'samples/s':>10s} {'s/step':>8s} {'samples/cpu-s':>14s} {'peak RSS GB':>12s} "
          f"{'above imports':>14s}")
    for r in rows.values():
        print(f"{r['arm']:44s} {r['samples_per_s']:10.3f} {r['step_s']:8.2f} {r['samples_per_cpu_s']:14.3f} "
              f"{r['peak_rss_gb']:12.2f} {r['peak_above_imports_gb']:14.2f}")
    ratios = {}
    for arm in ("cache", "live"):
        if arm in rows and "official" in rows:
            a, o = rows[arm], rows["official"]
            ratios[arm] = {"speedup": a["samples_per_s"] / o["samples_per_s"],
                           "cpu_speedup": a["samples_per_cpu_s"] / o["samples_per_cpu_s"],
                           "memory_ratio": a["peak_rss_gb"] / o["peak_rss_gb"]}
            r = ratios[arm]
            print(f"{a['arm']} / official: {r['speedup']:.2f}x samples/s wall, {r['cpu_speedup']:.2f}x samples "
                  f"per CPU-second, {r['memory_ratio']:.2f}x peak RSS" + (" (goals: >= 1.3x, <= 1)" if arm == "cache" else ""))
    print(json.dumps({"ratios": ratios, "rows": rows}))


if __name__ == "__main__":
    main()
