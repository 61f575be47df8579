"""Train the embedded default model: a small Stable Diffusion on the shapes data.

    python -m edgesd.models.training.train OUT [--device cuda] [--vae-steps N] [--unet-steps N]

Seeded and resumable: OUT/checkpoint.pt holds every weight, optimiser state and the
step reached; running the same command again continues from it. The result,
OUT/diffusers/, is an ordinary diffusers StableDiffusionPipeline folder that
`edgesd export` treats like any SD checkpoint.

Architecture (SD's, scaled down): AutoencoderKL with a 4x downscale and 4 latent
channels; CLIPTextModel with the real 49,408-token CLIP vocabulary; a
UNet2DConditionModel with cross-attention; scaled_linear betas, epsilon prediction;
the caption is dropped for 10% of samples so classifier-free guidance works.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgesd.tokenizer import ClipTokenizer

from . import shapes

IMAGE_SIDE = 64


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    dataset_size: int = 120_000
    batch_size: int = 256
    vae_steps: int = 2_000
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 6_000
    unet_lr: float = 5e-4
    text_lr: float = 5e-4
    caption_dropout: float = 0.1
    warmup_steps: int = 200
    log_every: int = 100
    checkpoint_every: int = 1_000


VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    norm_num_groups=16, sample_size=IMAGE_SIDE, scaling_factor=1.0,
)
UNET_CONFIG = dict(
    sample_size=IMAGE_SIDE // 4, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(64, 128, 128), norm_num_groups=16, cross_attention_dim=64, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
    max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    hidden_act="quick_gelu",
)
SCHEDULER_CONFIG = dict(
    _class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False,
    prediction_type="epsilon", timestep_spacing="leading",
)


def make_dataset(cfg: TrainConfig) -> tuple[np.ndarray, list[str]]:
    """Pre-render the training set: (N, 64, 64, 3) uint8 images and captions; held-out combos excluded."""
    rng = np.random.default_rng(cfg.seed)
    held_out = shapes.held_out_combos()
    images = np.empty((cfg.dataset_size, IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
    captions = []
    for i in range(cfg.dataset_size):
        scene = shapes.sample_scene(rng, exclude=held_out)
        images[i] = np.asarray(shapes.render(scene, IMAGE_SIDE, rng))
        captions.append(shapes.caption(scene, rng))
    return images, captions


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class Trainer:
    def __init__(self, out: Path, cfg: TrainConfig, device: str):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        self.out, self.cfg, self.device = out, cfg, device
        torch.manual_seed(cfg.seed)
        self.vae = AutoencoderKL(**VAE_CONFIG).to(device)
        self.unet = UNet2DConditionModel(**UNET_CONFIG).to(device)
        self.text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)).to(device)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=cfg.vae_lr)
        self.unet_opt = torch.optim.AdamW([
            {"params": self.unet.parameters(), "lr": cfg.unet_lr},
            {"params": self.text.parameters(), "lr": cfg.text_lr},
        ], weight_decay=1e-2)
        self.vae_step = 0
        self.unet_step = 0
        self.generator = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
        betas = torch.linspace(SCHEDULER_CONFIG["beta_start"] ** 0.5, SCHEDULER_CONFIG["beta_end"] ** 0.5, 1000) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).to(device)
        self.tokenizer = ClipTokenizer.packaged()

    # --- checkpoints -----------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save(self) -> None:
        state = {
            "config": asdict(self.cfg), "vae": self.vae.state_dict(), "unet": self.unet.state_dict(),
            "text": self.text.state_dict(), "vae_opt": self.vae_opt.state_dict(),
            "unet_opt": self.unet_opt.state_dict(), "vae_step": self.vae_step, "unet_step": self.unet_step,
            "generator": self.generator.get_state(),
        }
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.checkpoint_path)

    def init_from(self, folder: Path) -> None:
        """Start from the weights of a diffusers folder this script wrote (fresh optimiser state)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        self.vae.load_state_dict(AutoencoderKL.from_pretrained(folder / "vae").state_dict())
        self.unet.load_state_dict(UNet2DConditionModel.from_pretrained(folder / "unet").state_dict())
        self.text.load_state_dict(CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict())

    def load(self) -> bool:
        if not self.checkpoint_path.exists():
            return False
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=False)
        self.vae.load_state_dict(state["vae"])
        self.unet.load_state_dict(state["unet"])
        self.text.load_state_dict(state["text"])
        self.vae_opt.load_state_dict(state["vae_opt"])
        self.unet_opt.load_state_dict(state["unet_opt"])
        self.vae_step, self.unet_step = state["vae_step"], state["unet_step"]
        self.generator.set_state(state["generator"])
        return True

    # --- training --------------------------------------------------------------------------

    def _batch_indices(self, n: int) -> torch.Tensor:
        return torch.randint(0, n, (self.cfg.batch_size,), generator=self.generator)

    def train_vae(self, images: torch.Tensor, deadline: float) -> None:
        cfg = self.cfg
        self.vae.train()
        while self.vae_step < cfg.vae_steps and time.time() < deadline:
            for group in self.vae_opt.param_groups:
                group["lr"] = lr_at(self.vae_step, cfg.vae_steps, cfg.vae_lr, cfg.warmup_steps)
            x = images[self._batch_indices(len(images)).to(images.device)].float().div(127.5).sub(1)
            x = x.permute(0, 3, 1, 2).contiguous()
            with torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.device != "cpu"):
                posterior = self.vae.encode(x).latent_dist
                recon = self.vae.decode(posterior.sample()).sample
            loss_rec = F.l1_loss(recon.float(), x) + F.mse_loss(recon.float(), x)
            loss = loss_rec + cfg.vae_kl_weight * posterior.kl().mean()
            self.vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.vae_opt.step()
            self.vae_step += 1
            if self.vae_step % cfg.log_every == 0:
                print(f"vae  step {self.vae_step:>6}  loss {loss_rec.item():.4f}", flush=True)
            if self.vae_step % cfg.checkpoint_every == 0:
                self.save()

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Latent means of the whole set, and the scaling factor giving them unit variance (SD's recipe)."""
        self.vae.eval()
        chunks = []
        for i in range(0, len(images), 1024):
            x = images[i:i + 1024].float().div(127.5).sub(1).permute(0, 3, 1, 2).contiguous()
            chunks.append(self.vae.encode(x).latent_dist.mean)
        latents = torch.cat(chunks)
        return latents, float(1.0 / latents.std())

    def train_unet(self, latents: torch.Tensor, token_ids: torch.Tensor, empty_ids: torch.Tensor,
                   scale: float, deadline: float) -> None:
        cfg = self.cfg
        self.unet.train()
        self.text.train()
        device = latents.device
        total, first = cfg.unet_steps, self.unet_step
        timed_from = time.time()
        while self.unet_step < total and time.time() < deadline:
            if self.unet_step == first + 20:  # past the first, slow (autotuning) steps
                timed_from = time.time()
            if self.unet_step == first + 120 and deadline < float("inf"):
                # Fit the schedule (and its learning-rate decay) into the time left.
                per_step = (time.time() - timed_from) / 100
                total = min(total, self.unet_step + int(0.95 * (deadline - time.time()) / per_step))
                print(f"unet {per_step:.3f} s/step: training to step {total}", flush=True)
            for group, peak in zip(self.unet_opt.param_groups, (cfg.unet_lr, cfg.text_lr)):
                group["lr"] = lr_at(self.unet_step, total, peak, cfg.warmup_steps)
            idx = self._batch_indices(len(latents)).to(device)
            z0 = latents[idx] * scale
            ids = token_ids[idx]
            drop = torch.rand(len(ids), generator=self.generator).to(device) < cfg.caption_dropout
            ids = torch.where(drop[:, None], empty_ids[None, :], ids)
            t = torch.randint(0, 1000, (len(ids),), generator=self.generator).to(device)
            noise = torch.randn(z0.shape, generator=self.generator).to(device)
            a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
            zt = a.sqrt() * z0 + (1 - a).sqrt() * noise  # Ho et al. 2020, Eq. 4
            with torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.device != "cpu"):
                context = self.text(input_ids=ids).last_hidden_state
                pred = self.unet(zt, t, context).sample
            loss = F.mse_loss(pred.float(), noise)
            self.unet_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([*self.unet.parameters(), *self.text.parameters()], 1.0)
            self.unet_opt.step()
            self.unet_step += 1
            if self.unet_step % cfg.log_every == 0:
                print(f"unet step {self.unet_step:>6}  loss {loss.item():.4f}", flush=True)
            if self.unet_step % cfg.checkpoint_every == 0:
                self.save()

    def save_diffusers(self, scale: float) -> Path:
        from diffusers import PNDMScheduler, StableDiffusionPipeline
        from transformers import CLIPTokenizer

        target = self.out / "diffusers"
        self.vae.register_to_config(scaling_factor=scale)
        tok_dir = self.out / "tokenizer-files"
        ClipTokenizer.packaged().write_folder(tok_dir)
        pipe = StableDiffusionPipeline(
            vae=self.vae.eval().float().cpu(), text_encoder=self.text.eval().float().cpu(),
            tokenizer=CLIPTokenizer.from_pretrained(tok_dir), unet=self.unet.eval().float().cpu(),
            scheduler=PNDMScheduler.from_config(SCHEDULER_CONFIG), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(target)
        return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vae-steps", type=int, default=TrainConfig.vae_steps)
    parser.add_argument("--unet-steps", type=int, default=TrainConfig.unet_steps)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--dataset-size", type=int, default=TrainConfig.dataset_size)
    parser.add_argument("--minutes", type=float, default=0.0,
                        help="Fit the U-Net schedule into this many minutes in all (0: no limit).")
    parser.add_argument("--init-from", type=Path, help="A diffusers folder from an earlier run to start from.")
    args = parser.parse_args()
    cfg = TrainConfig(vae_steps=args.vae_steps, unet_steps=args.unet_steps, batch_size=args.batch_size,
                      dataset_size=args.dataset_size)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    deadline = started + args.minutes * 60 if args.minutes else float("inf")
    trainer = Trainer(args.out, cfg, args.device)
    if trainer.load():
        print(f"resumed: vae step {trainer.vae_step}, unet step {trainer.unet_step}", flush=True)
    elif args.init_from:
        trainer.init_from(args.init_from)
        print(f"started from the weights in {args.init_from}", flush=True)
    images_np, captions = make_dataset(cfg)
    print(f"dataset: {len(captions)} pictures in {time.time() - started:.0f} s", flush=True)
    images = torch.from_numpy(images_np).to(args.device)
    trainer.train_vae(images, deadline)
    latents, scale = trainer.encode_latents(images)
    token_ids = torch.from_numpy(trainer.tokenizer(captions)).to(args.device)
    empty_ids = torch.from_numpy(trainer.tokenizer([""])[0]).to(args.device)
    trainer.train_unet(latents, token_ids, empty_ids, scale, deadline)
    trainer.save()
    done = trainer.vae_step >= cfg.vae_steps
    summary = {"config": asdict(cfg), "vae_step": trainer.vae_step, "unet_step": trainer.unet_step, "latent_scale": scale,
               "seconds": round(time.time() - started, 1), "device": args.device, "finished": done,
               "params": {name: sum(p.numel() for p in m.parameters())
                          for name, m in (("vae", trainer.vae), ("unet", trainer.unet), ("text", trainer.text))}}
    summary["diffusers"] = str(trainer.save_diffusers(scale))  # a usable snapshot even if unfinished
    (args.out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
