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

Colour binding ("a red circle on a blue background", not a blue circle on red) is the hard
part. To help it, the text encoder also learns to parse captions: a linear head on its pooled
output predicts the stated background colour, shape colour, shape, position and size (an
auxiliary cross-entropy, weight `aux_weight`; the head is dropped after training). Token rows
never seen in training are set to the row of a filler word, so unknown words in a user's prompt
act as filler and the exported embedding table deduplicates to a few hundred rows.
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
    filler_rate: float = 0.15
    aux_weight: float = 0.1
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
    block_out_channels=(64, 128, 192), norm_num_groups=16, cross_attention_dim=128, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
    max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    hidden_act="quick_gelu",
)
SCHEDULER_CONFIG = dict(
    _class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False,
    prediction_type="epsilon", timestep_spacing="leading",
)


def make_dataset(cfg: TrainConfig) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Pre-render the training set, held-out combos excluded.

    Returns (N, 64, 64, 3) uint8 images, captions, and (N, 5) int64 stated attributes (-1: unstated).
    """
    rng = np.random.default_rng(cfg.seed)
    held_out = shapes.held_out_combos()
    images = np.empty((cfg.dataset_size, IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
    captions, labels = [], []
    for i in range(cfg.dataset_size):
        scene = shapes.sample_scene(rng, exclude=held_out)
        images[i] = np.asarray(shapes.render(scene, IMAGE_SIDE, rng))
        captions.append(shapes.caption(scene, rng, cfg.filler_rate))
        labels.append(shapes.stated_attributes(scene, captions[-1]))
    return images, captions, np.array(labels, dtype=np.int64)


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
        classes = [len(v) for v in shapes.ATTRIBUTES.values()]
        self.aux_head = torch.nn.Linear(TEXT_CONFIG["hidden_size"], sum(classes)).to(device)
        self.aux_splits = classes
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=cfg.vae_lr)
        self.unet_opt = torch.optim.AdamW([
            {"params": self.unet.parameters(), "lr": cfg.unet_lr},
            {"params": [*self.text.parameters(), *self.aux_head.parameters()], "lr": cfg.text_lr},
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
            "text": self.text.state_dict(), "aux_head": self.aux_head.state_dict(), "vae_opt": self.vae_opt.state_dict(),
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
        self.aux_head.load_state_dict(state["aux_head"])
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

    def aux_loss(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the caption's stated attributes from the pooled text state; -1 labels skipped."""
        logits = self.aux_head(pooled.float()).split(self.aux_splits, dim=1)
        return sum(F.cross_entropy(lg, labels[:, i], ignore_index=-1) for i, lg in enumerate(logits))

    def train_unet(self, latents: torch.Tensor, token_ids: torch.Tensor, empty_ids: torch.Tensor,
                   labels: torch.Tensor, scale: float, deadline: float) -> None:
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
            stated = torch.where(drop[:, None], -1, labels[idx])
            t = torch.randint(0, 1000, (len(ids),), generator=self.generator).to(device)
            noise = torch.randn(z0.shape, generator=self.generator).to(device)
            a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
            zt = a.sqrt() * z0 + (1 - a).sqrt() * noise  # Ho et al. 2020, Eq. 4
            with torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.device != "cpu"):
                encoded = self.text(input_ids=ids)
                pred = self.unet(zt, t, encoded.last_hidden_state).sample
            loss_eps = F.mse_loss(pred.float(), noise)
            loss_aux = self.aux_loss(encoded.pooler_output, stated)
            loss = loss_eps + cfg.aux_weight * loss_aux
            self.unet_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([*self.unet.parameters(), *self.text.parameters(),
                                            *self.aux_head.parameters()], 1.0)
            self.unet_opt.step()
            self.unet_step += 1
            if self.unet_step % cfg.log_every == 0:
                print(f"unet step {self.unet_step:>6}  loss {loss_eps.item():.4f}  aux {loss_aux.item():.3f}",
                      flush=True)
            if self.unet_step % cfg.checkpoint_every == 0:
                self.save()

    @torch.no_grad()
    def tie_unseen_tokens(self, token_ids: torch.Tensor) -> int:
        """Give every token row never seen in training the filler word's row; returns the unseen count."""
        table = self.text.get_input_embeddings().weight
        seen = torch.zeros(len(table), dtype=torch.bool, device=table.device)
        seen[token_ids.flatten().to(table.device)] = True
        filler = int(self.tokenizer([shapes.FILLER_TOKEN_WORD])[0][1])
        assert seen[filler], "the filler word must occur in the training captions"
        table[~seen] = table[filler].clone()
        return int((~seen).sum())

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


def evaluate(folder: Path, device: str, steps: int = 20, guidance: float = 7.5) -> dict:
    """Adherence of the diffusers model on held-out and on (as many) training combinations."""
    from diffusers import StableDiffusionPipeline

    from ..adherence import held_out_prompts, prompts_for, score

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None).to(device)
    pipe.set_progress_bar_config(disable=True)
    held_out = shapes.held_out_combos()
    rng = np.random.default_rng(7)
    train_combos = [c for c in shapes.all_combos() if c not in held_out]
    train_combos = [train_combos[i] for i in rng.choice(len(train_combos), len(held_out), replace=False)]
    result = {}
    for name, items in (("held_out", held_out_prompts()), ("training", prompts_for(train_combos))):
        prompts, scenes = [p for p, _ in items], [s for _, s in items]
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance,
                      generator=torch.Generator(device).manual_seed(0)).images
        result[name] = score(images, scenes)
        print(f"adherence {name}: {result[name]}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vae-steps", type=int, default=TrainConfig.vae_steps)
    parser.add_argument("--unet-steps", type=int, default=TrainConfig.unet_steps)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--dataset-size", type=int, default=TrainConfig.dataset_size)
    parser.add_argument("--aux-weight", type=float, default=TrainConfig.aux_weight,
                        help="Weight of the auxiliary caption-parsing loss (0: off).")
    parser.add_argument("--minutes", type=float, default=0.0,
                        help="Fit the U-Net schedule into this many minutes in all (0: no limit).")
    parser.add_argument("--init-from", type=Path, help="A diffusers folder from an earlier run to start from.")
    parser.add_argument("--evaluate", action="store_true",
                        help="Score prompt adherence (held-out and training combinations) with diffusers at the end.")
    args = parser.parse_args()
    cfg = TrainConfig(vae_steps=args.vae_steps, unet_steps=args.unet_steps, batch_size=args.batch_size,
                      dataset_size=args.dataset_size, aux_weight=args.aux_weight)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    deadline = started + args.minutes * 60 if args.minutes else float("inf")
    trainer = Trainer(args.out, cfg, args.device)
    if trainer.load():
        print(f"resumed: vae step {trainer.vae_step}, unet step {trainer.unet_step}", flush=True)
    elif args.init_from:
        trainer.init_from(args.init_from)
        print(f"started from the weights in {args.init_from}", flush=True)
    images_np, captions, labels_np = make_dataset(cfg)
    print(f"dataset: {len(captions)} pictures in {time.time() - started:.0f} s", flush=True)
    images = torch.from_numpy(images_np).to(args.device)
    trainer.train_vae(images, deadline)
    latents, scale = trainer.encode_latents(images)
    token_ids = torch.from_numpy(trainer.tokenizer(captions)).to(args.device)
    empty_ids = torch.from_numpy(trainer.tokenizer([""])[0]).to(args.device)
    labels = torch.from_numpy(labels_np).to(args.device)
    trainer.train_unet(latents, token_ids, empty_ids, labels, scale, deadline)
    trainer.save()
    unseen = trainer.tie_unseen_tokens(token_ids)
    done = trainer.vae_step >= cfg.vae_steps
    summary = {"config": asdict(cfg), "vae_step": trainer.vae_step, "unet_step": trainer.unet_step, "latent_scale": scale,
               "seconds": round(time.time() - started, 1), "device": args.device, "finished": done,
               "params": {name: sum(p.numel() for p in m.parameters())
                          for name, m in (("vae", trainer.vae), ("unet", trainer.unet), ("text", trainer.text))}}
    summary["unseen_token_rows"] = unseen
    summary["diffusers"] = str(trainer.save_diffusers(scale))  # a usable snapshot even if unfinished
    if args.evaluate:
        summary["adherence"] = evaluate(Path(summary["diffusers"]), args.device)
    (args.out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
