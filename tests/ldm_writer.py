"""The tests' own diffusers -> LDM/SGM single-file writer (written apart from runtime/ldm_layout.py, which reads
the other way). diffusers' `from_single_file` checks the files it writes are the real layout."""

from __future__ import annotations

from pathlib import Path

import torch


def _unet(state: dict, config: dict) -> dict:
    per = config["layers_per_block"] + 1
    renames = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
               ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
               ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2.")]
    resnet = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
              ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection.")]
    out = {}
    for key, value in state.items():
        p = key.split(".")
        new = None
        for a, b in renames:
            if key.startswith(a):
                new = b + key[len(a):]
        if p[0] in ("down_blocks", "up_blocks"):
            level, kind, j, rest = int(p[1]), p[2], int(p[3]), ".".join(p[4:]) + "."
            down = p[0] == "down_blocks"
            base = 1 + level * per if down else level * per
            if kind == "resnets":
                for a, b in resnet:
                    rest = b + rest[len(a):] if rest.startswith(a) else rest
                new = f"{'input' if down else 'output'}_blocks.{base + j}.0.{rest}"
            elif kind == "attentions":
                new = f"{'input' if down else 'output'}_blocks.{base + j}.1.{rest}"
            elif down:
                new = f"input_blocks.{base + per - 1}.0.op.{rest[len('conv.'):]}"
            else:
                slot = 2 if "CrossAttn" in config["up_block_types"][level] else 1
                new = f"output_blocks.{base + per - 1}.{slot}.{rest}"
            new = new[:-1]
        elif p[0] == "mid_block":
            rest = ".".join(p[3:])
            if p[1] == "attentions":
                new = "middle_block.1." + rest
            else:
                for a, b in resnet:
                    rest = b[:-1] + rest[len(a) - 1:] if rest.startswith(a) else rest
                new = f"middle_block.{2 * int(p[2])}.{rest}"
        assert new is not None, key
        out["model.diffusion_model." + new] = value
    return out


def _vae(state: dict, config: dict) -> dict:
    levels = len(config["up_block_types"])
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
    out = {}
    for key, value in state.items():
        p = key.split(".")
        new = key
        if p[1] in ("down_blocks", "up_blocks"):
            level = int(p[2]) if p[1] == "down_blocks" else levels - 1 - int(p[2])
            where = f"{p[0]}.{'down' if p[1] == 'down_blocks' else 'up'}.{level}"
            if p[3] == "resnets":
                new = f"{where}.block.{p[4]}." + ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
            else:
                new = f"{where}.{'downsample' if p[3] == 'downsamplers' else 'upsample'}." + ".".join(p[5:])
        elif p[1] == "mid_block" and p[2] == "resnets":
            new = f"{p[0]}.mid.block_{int(p[3]) + 1}." + ".".join(p[4:]).replace("conv_shortcut", "nin_shortcut")
        elif p[1] == "mid_block":
            tail = p[-1]
            new = f"{p[0]}.mid.attn_1.{attention[p[4]]}.{tail}"
            if tail == "weight" and value.ndim == 2:
                value = value[:, :, None, None]
        elif p[1] == "conv_norm_out":
            new = f"{p[0]}.norm_out.{p[2]}"
        out["first_stage_model." + new] = value
    return out


def _open_clip(state: dict, prefix: str, extra_layer: bool) -> dict:
    """transformers CLIP -> OpenCLIP; `extra_layer` adds the last layer SD 2.x never runs (as in real files)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    out = {prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
           prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": state["final_layer_norm.weight"],
           prefix + "ln_final.bias": state["final_layer_norm.bias"]}
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state["text_projection.weight"].T.contiguous()
    else:  # SD 2.x files carry OpenCLIP's projection too
        width = state["final_layer_norm.weight"].shape[0]
        out[prefix + "text_projection"] = torch.randn(width, width)
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for i in layers + ([layers[-1] + 1] if extra_layer else []):
        src = i if i in layers else layers[-1]
        lp, op = f"encoder.layers.{src}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[op + f"attn.in_proj_{kind}"] = torch.cat([state[lp + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
            for a, b in names.items():
                out[op + f"{b}.{kind}"] = state[lp + f"{a}.{kind}"]
    out[prefix + "logit_scale"] = torch.tensor(4.6)
    return out


def ldm_state(states: dict[str, dict], configs: dict[str, dict]) -> dict:
    """Components' diffusers / transformers state dicts (unet, vae, text_encoder[, text_encoder_2]) -> one LDM
    checkpoint's tensors."""
    def hf_clip(state):  # real files keep transformers 4.x names: text_model.*
        return {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
                for k, v in state.items()}

    out = {**_unet(states["unet"], configs["unet"]), **_vae(states["vae"], configs["vae"])}
    if "text_encoder_2" in states:
        out.update({"conditioner.embedders.0.transformer." + k: v for k, v in hf_clip(states["text_encoder"]).items()})
        out.update(_open_clip(states["text_encoder_2"], "conditioner.embedders.1.model.", extra_layer=False))
    elif configs["text_encoder"]["hidden_act"] == "gelu":  # SD 2.x: OpenCLIP
        out.update(_open_clip(states["text_encoder"], "cond_stage_model.model.", extra_layer=True))
    else:
        out.update({"cond_stage_model.transformer." + k: v for k, v in hf_clip(states["text_encoder"]).items()})
    out["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)  # LDM's schedule buffers, not weights
    return out


def write_single_file(folder: Path, path: Path, dtype: torch.dtype = torch.float32, ema: bool = True,
                      extra: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    """The diffusers folder `folder` as one LDM/SGM checkpoint (`path`), as A1111 and civitai files are;
    `extra` tensors added and `drop` keys left out (for the bad-input tests)."""
    import json

    from safetensors.torch import load_file, save_file

    components = [c for c in ("unet", "vae", "text_encoder", "text_encoder_2") if (folder / c).is_dir()]
    states = {c: {k: v for f in sorted((folder / c).glob("*.safetensors")) for k, v in load_file(f).items()}
              for c in components}
    configs = {c: json.loads((folder / c / "config.json").read_text()) for c in components}
    state = ldm_state(states, configs)
    if ema:
        state["model_ema.decay"] = torch.tensor(0.9999)
    state.update(extra or {})
    state = {k: v for k, v in state.items() if k not in drop}
    save_file({k: v.to(dtype).clone().contiguous() if v.is_floating_point() else v for k, v in state.items()},
              str(path))
    return path
