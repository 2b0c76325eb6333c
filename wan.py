"""Wan2.1's files: the DiT's weights from either official layout, the UMT5 text encoder and the
VAE, and WanWorld, Wan as the scripts see it (toy_world.ToyWorld is the same interface for the
toy world).

Nothing here is CausVid; it is what turns a local Wan2.1-T2V-1.3B directory into causvid.DiT, text
embeddings and pixels. Our DiT's parameter names are Wan2.1's original ones, so the original release
loads unchanged; WAN_TO_DIFFUSERS maps them to the diffusers release's names.
"""

import copy
import json
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import asdict

import torch
import torch.nn as nn
from einops import rearrange

import causvid as cv

# ------------------------------------------------------------------------------------------------
# The text encoder: UMT5 through transformers
# ------------------------------------------------------------------------------------------------


class TextEncoder(nn.Module):
    """Frozen UMT5 encoder. Prompts -> (B, L, D_text) with the positions after each prompt's end
    zeroed, as Wan does. The empty prompt "" (or Wan's negative prompt) is the unconditional one."""

    def __init__(self, tokenizer, encoder: nn.Module, text_len: int):
        super().__init__()
        self.tokenizer, self.encoder, self.text_len = (
            tokenizer,
            encoder.eval().requires_grad_(False),
            text_len,
        )

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> torch.Tensor:
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise cv.CausVidError(
                f"prompts must be a non-empty list of strings, got {prompts!r:.80}"
            )
        for p, n in zip(prompts, map(len, self.tokenizer(list(prompts)).input_ids)):
            if n > self.text_len:  # documented behaviour: truncate, and say so
                warnings.warn(
                    f"prompt {p!r:.60} is {n} tokens, longer than the text length {self.text_len}; "
                    f"only its first {self.text_len} tokens are used",
                    stacklevel=2,
                )
        device = next(self.encoder.parameters()).device
        tok = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.text_len,
            truncation=True,
            return_tensors="pt",
        )
        ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
        out = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return out * mask.unsqueeze(-1).to(out.dtype)

    def embed(self, prompts: list[str], batch: int = 64) -> dict[str, torch.Tensor]:
        """Encode a fixed set of prompts once: prompt -> (L, D_text), kept on the CPU."""
        unique = list(dict.fromkeys(prompts))
        out = {}
        for i in range(0, len(unique), batch):
            out.update(zip(unique[i : i + batch], self(unique[i : i + batch]).float().cpu()))
        return out


def load_umt5(path: str, text_len: int, dtype=torch.float32) -> TextEncoder:
    """UMT5 from a transformers directory (Wan2.1-T2V-1.3B-Diffusers/text_encoder,
    tokenizer/ beside it)."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    if not path:
        raise cv.CausVidError(
            "no text encoder: pass --model-dir with a text_encoder/ inside (the diffusers layout), "
            "or --text-encoder DIR (the original release's UMT5 .pth is in another format: use "
            "Wan2.1-T2V-1.3B-Diffusers/text_encoder)"
        )
    if not os.path.isdir(path):
        raise cv.CausVidError(
            f"text encoder directory {path!r} not found; pass the directory that holds "
            "a transformers UMT5 encoder (e.g. Wan2.1-T2V-1.3B-Diffusers/text_encoder)"
        )
    tok_path = os.path.join(os.path.dirname(path.rstrip("/")), "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tok_path if os.path.isdir(tok_path) else path)
    return TextEncoder(tokenizer, UMT5EncoderModel.from_pretrained(path, dtype=dtype), text_len)


# ------------------------------------------------------------------------------------------------
# The DiT's weights
# ------------------------------------------------------------------------------------------------

# Our (= Wan's original) module names -> diffusers' WanTransformer3DModel names,
# "{i}" the block index.
# Wan's norm3 (the affine cross-attention norm) is diffusers' norm2;
# Wan's norm2 (FFN) is their norm3.
WAN_TO_DIFFUSERS = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "blocks.{i}.self_attn.q": "blocks.{i}.attn1.to_q",
    "blocks.{i}.self_attn.k": "blocks.{i}.attn1.to_k",
    "blocks.{i}.self_attn.v": "blocks.{i}.attn1.to_v",
    "blocks.{i}.self_attn.o": "blocks.{i}.attn1.to_out.0",
    "blocks.{i}.self_attn.norm_q": "blocks.{i}.attn1.norm_q",
    "blocks.{i}.self_attn.norm_k": "blocks.{i}.attn1.norm_k",
    "blocks.{i}.cross_attn.q": "blocks.{i}.attn2.to_q",
    "blocks.{i}.cross_attn.k": "blocks.{i}.attn2.to_k",
    "blocks.{i}.cross_attn.v": "blocks.{i}.attn2.to_v",
    "blocks.{i}.cross_attn.o": "blocks.{i}.attn2.to_out.0",
    "blocks.{i}.cross_attn.norm_q": "blocks.{i}.attn2.norm_q",
    "blocks.{i}.cross_attn.norm_k": "blocks.{i}.attn2.norm_k",
    "blocks.{i}.norm3": "blocks.{i}.norm2",
    "blocks.{i}.ffn.0": "blocks.{i}.ffn.net.0.proj",
    "blocks.{i}.ffn.2": "blocks.{i}.ffn.net.2",
    "blocks.{i}.modulation": "blocks.{i}.scale_shift_table",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
}


def diffusers_key(key: str) -> str:
    """Our parameter name -> diffusers' name, through WAN_TO_DIFFUSERS."""
    m = re.match(r"blocks\.(\d+)\.(.*)", key)
    i, rest = (m.group(1), "blocks.{i}." + m.group(2)) if m else (None, key)
    module, _, param = rest.rpartition(".")
    for ours, theirs in (
        (rest, None),
        (module, param),
    ):  # parameters with no suffix, then module.param
        if ours in WAN_TO_DIFFUSERS:
            name = WAN_TO_DIFFUSERS[ours].format(i=i)
            return name if theirs is None else f"{name}.{theirs}"
    raise KeyError(f"no diffusers name for parameter {key!r}")


def load_state_dict_strict(
    model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint"
):
    """load_state_dict that names every missing, unexpected or mis-shaped key in one error."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise cv.CausVidError(
            f"{source} does not fit the model: missing {missing}, unexpected {unexpected}, "
            f"shape mismatches {shapes}"
        )
    model.load_state_dict(state)


def from_diffusers_state_dict(model: cv.DiT, state: dict[str, torch.Tensor]) -> cv.DiT:
    """Load a diffusers WanTransformer3DModel state dict into our DiT (strict)."""
    names = {key: diffusers_key(key) for key in model.state_dict()}
    unexpected = sorted(set(state) - set(names.values()))
    if unexpected:
        raise cv.CausVidError(f"diffusers state dict has keys our DiT does not: {unexpected}")
    load_state_dict_strict(
        model, {k: state[n] for k, n in names.items() if n in state}, "diffusers state dict"
    )
    return model


def save_diffusers(model: cv.DiT, path: str):
    """Our DiT as a diffusers WanTransformer3DModel directory (config.json + one .safetensors), the
    reverse of from_diffusers_state_dict: WanTransformer3DModel.from_pretrained(path) loads it."""
    from safetensors.torch import save_file

    cfg = model.cfg
    config = {
        "_class_name": "WanTransformer3DModel",
        "patch_size": list(cfg.patch_size),
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.dim // cfg.num_heads,
        "in_channels": cfg.channels,
        "out_channels": cfg.channels,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": cfg.eps,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 1024,
    }
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    state = {
        diffusers_key(k): v.detach().float().cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(
        state, os.path.join(path, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"}
    )


def read_safetensors_dir(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory:
    its one .safetensors file, or the shards its index lists."""
    from safetensors.torch import load_file

    names = os.listdir(path)
    index = [n for n in names if n.endswith(".safetensors.index.json")]
    if index:
        with open(os.path.join(path, index[0])) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(n for n in names if n.endswith(".safetensors"))
    if not files:
        raise cv.CausVidError(f"no .safetensors weights in {path!r}")
    state = {}
    for name in files:
        if not os.path.isfile(os.path.join(path, name)):
            raise cv.CausVidError(
                f"{path!r}: shard {name!r} listed in {index[0]!r} is missing; download it again"
            )
        state.update(load_file(os.path.join(path, name)))
    return state


def wan_config(model_dir: str, base: cv.Config) -> tuple[cv.Config, str, str]:
    """-> (config, the DiT's directory, its layout). The DiT's shapes come from the directory's
    config.json, the rest (training, sampling) from `base`; text encoder and VAE paths are set to
    the diffusers layout's text_encoder/ and vae/ where they exist.
      original  (Wan2.1-T2V-1.3B):           config.json + diffusion_pytorch_model*.safetensors,
                                             Wan names
      diffusers (Wan2.1-T2V-1.3B-Diffusers): transformer/{config.json, *.safetensors[, index]},
                                             text_encoder/, tokenizer/, vae/"""
    sub = os.path.join(model_dir, "transformer")
    layout, dit_dir = ("diffusers", sub) if os.path.isdir(sub) else ("original", model_dir)
    try:
        with open(os.path.join(dit_dir, "config.json")) as f:
            c = json.load(f)
    except OSError:
        raise cv.CausVidError(
            f"{model_dir!r} is not a Wan2.1 directory: no config.json in it or in transformer/"
        ) from None
    if layout == "diffusers":
        shapes = dict(
            dim=c["num_attention_heads"] * c["attention_head_dim"],
            num_heads=c["num_attention_heads"],
            channels=c["in_channels"],
            patch_size=tuple(c["patch_size"]),
            ffn_dim=c["ffn_dim"],
            num_layers=c["num_layers"],
            text_dim=c["text_dim"],
            freq_dim=c["freq_dim"],
            eps=c["eps"],
        )
    else:
        shapes = dict(
            dim=c["dim"],
            num_heads=c["num_heads"],
            channels=c["in_dim"],
            ffn_dim=c["ffn_dim"],
            num_layers=c["num_layers"],
            text_dim=c.get("text_dim", 4096),
            freq_dim=c["freq_dim"],
            patch_size=tuple(c.get("patch_size", (1, 2, 2))),
            eps=c["eps"],
        )
    parts = {
        k: os.path.abspath(os.path.join(model_dir, k))
        for k in ("text_encoder", "vae")
        if os.path.isdir(os.path.join(model_dir, k))
    }
    return cv.Config(**{**asdict(base), **shapes, **parts}), dit_dir, layout


def load_wan(model_dir: str, base: cv.Config, causal: bool = False) -> cv.DiT:
    """An official Wan2.1 DiT from a local directory (either layout, see wan_config), strictly: a
    missing or unexpected key is an error that lists them."""
    cfg, dit_dir, layout = wan_config(model_dir, base)
    model, state = cv.DiT(cfg, causal), read_safetensors_dir(dit_dir)
    if layout == "diffusers":
        return from_diffusers_state_dict(model, state)
    load_state_dict_strict(model, state, model_dir)
    return model


# ------------------------------------------------------------------------------------------------
# The VAE
# ------------------------------------------------------------------------------------------------


def pixel_frames(latent_frames: int) -> int:
    """Wan's causal VAE: latent frame 0 is one pixel frame, every later one four."""
    return 1 + 4 * (latent_frames - 1)


def latent_frames(pixel_frames: int) -> int:
    """The latent frames of 1 + 4k pixel frames (of fewer frames than that, the whole ones)."""
    return 1 + (pixel_frames - 1) // 4


class WanVAE:
    """diffusers' AutoencoderKLWan with Wan's per-channel latent normalisation, video in
    (B, F, C, H, W) layout. 4x temporal compression (1 + 4k frames <-> 1 + k latents), 8x spatial,
    16 channels. decode_stream decodes latent chunks as they arrive, keeping the causal decoder's
    cache between chunks, so the result equals decoding the whole video at once (it drives
    diffusers' internal per-frame decode loop, AutoencoderKLWan._decode, with the cache kept)."""

    def fork(self) -> "WanVAE":
        """Another handle on the same weights with a causal cache of its own: encode_stream and
        decode_stream keep their state on the module, so streams made at once need one each."""
        other = copy.copy(self)
        other.vae = copy.copy(self.vae)  # (the cache attributes are set on the copy, not shared)
        return other

    def __init__(self, path_or_vae, device="cpu", dtype=torch.float32):
        """path_or_vae: a diffusers AutoencoderKLWan directory (loaded in `dtype`), or such a module
        already built (kept in its own dtype)."""
        from diffusers import AutoencoderKLWan

        vae = path_or_vae
        if not isinstance(vae, nn.Module):
            if not os.path.isdir(vae):
                raise cv.CausVidError(
                    f"VAE directory {vae!r} not found; pass Wan2.1-T2V-1.3B-Diffusers/vae "
                    "(--vae or --model-dir)"
                )
            vae = AutoencoderKLWan.from_pretrained(vae, torch_dtype=dtype)
        self.vae = vae.to(device).eval().requires_grad_(False)
        torch.backends.cudnn.benchmark = True  # its 3D convolutions
        c = self.vae.config
        self.mean = torch.tensor(c.latents_mean, device=device, dtype=dtype).view(1, 1, -1, 1, 1)
        self.std = torch.tensor(c.latents_std, device=device, dtype=dtype).view(1, 1, -1, 1, 1)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """pixels in [-1, 1] (B, 1 + 4k, 3, H, W) ->
        normalised latents (B, 1 + k, C, H / 8, W / 8)."""
        x = rearrange(video.to(self.mean.dtype), "b f c h w -> b c f h w")
        mu = self.vae.encode(x).latent_dist.mode()
        return (rearrange(mu, "b c f h w -> b f c h w") - self.mean) / self.std

    @torch.no_grad()
    def encode_stream(self, frames, chunk: int) -> Iterator[torch.Tensor]:
        """Pixel frames (B, n, 3, H, W) as they arrive, in pieces of any length -> normalised
        latent chunks (B, chunk, C, H / 8, W / 8), each as soon as its pixels are in: frame 0 alone
        makes latent 0, every later 4 frames one more (diffusers' own per-frame encode loop,
        AutoencoderKLWan._encode, driven with its causal cache kept between pieces, so the latents
        equal encode()'s)."""
        vae, buffer, latents, made = self.vae, None, [], 0
        vae.clear_cache()
        for x in frames:
            buffer = x if buffer is None else torch.cat([buffer, x], 1)
            while buffer.shape[1] >= (4 if made else 1):
                n, vae._enc_conv_idx = 4 if made else 1, [0]
                latents.append(
                    vae.encoder(
                        rearrange(buffer[:, :n].to(self.mean.dtype), "b f c h w -> b c f h w"),
                        feat_cache=vae._enc_feat_map,
                        feat_idx=vae._enc_conv_idx,
                    )
                )
                buffer, made = buffer[:, n:], made + 1
                if len(latents) == chunk:  # quant_conv is per frame; the mode is the mean half
                    mu = vae.quant_conv(torch.cat(latents, 2))[:, : vae.config.z_dim]
                    yield (rearrange(mu, "b c f h w -> b f c h w") - self.mean) / self.std
                    latents = []
        vae.clear_cache()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """normalised latents (B, 1 + k, C, h, w) -> pixels in [-1, 1] (B, 1 + 4k, 3, 8 h, 8 w)."""
        x = self.vae.decode(
            rearrange(z.to(self.mean.dtype) * self.std + self.mean, "b f c h w -> b c f h w")
        ).sample
        return rearrange(x, "b c f h w -> b f c h w")

    @torch.no_grad()
    def decode_stream(self, chunks) -> Iterator[torch.Tensor]:
        """Latent chunks (B, K, C, h, w) -> their pixels, chunk by chunk (the first latent frame
        gives one pixel frame, every later one four)."""
        vae, first = self.vae, True
        vae.clear_cache()
        for z in chunks:
            x = vae.post_quant_conv(
                rearrange(z.to(self.mean.dtype) * self.std + self.mean, "b f c h w -> b c f h w")
            )
            out = []
            for i in range(x.shape[2]):
                vae._conv_idx = [0]
                kw = {"first_chunk": True} if first else {}
                out.append(
                    vae.decoder(
                        x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, **kw
                    )
                )
                first = False
            yield rearrange(torch.cat(out, 2).clamp(-1, 1), "b c f h w -> b f c h w")
        vae.clear_cache()


# ------------------------------------------------------------------------------------------------
# Wan as the scripts see it
# ------------------------------------------------------------------------------------------------


class WanWorld:
    """Wan2.1 with toy_world.ToyWorld's members (see there). Wan brings no prompts, no videos and no
    scorer of its own: prompts come from --prompts / --prompt, the teacher from --model-dir, DMD's
    videos are the teacher's ODE end points (stage 1's pairs), and nothing is scored."""

    name = "Wan"
    prompts: list[str] = []
    # no progress GIFs: they would hold the VAE in training's memory
    preview_prompts: list[str] = []
    sampling_batch = 1  # videos sampled at once
    clips = None  # no video dataset to pre-train a teacher on
    pretrained_causal_teacher = None  # none is shipped (Causal Forcing's Wan teacher is theirs)
    pretrained_student = None  # a distilled Wan student is the run's own

    def __init__(
        self, cfg: cv.Config, device="cpu", dtype=torch.float32, model_dir: str | None = None
    ):
        self.cfg = cfg
        self.device = device
        self.dtype = dtype  # UMT5's and the VAE's
        self.pretrained_teacher = model_dir
        self.pixel_size = (8 * cfg.height, 8 * cfg.width)
        self.pairs_batch = min(64, cfg.batch_size)  # ODE pairs made at once (a shard)
        self.frozen_dtype = dtype  # the frozen teacher's weights in DMD: bf16 on a GPU
        self._vae = None

    # prompts and text

    def text_encoder(self, checkpoint: str | None = None) -> TextEncoder:
        """UMT5 from cfg.text_encoder (the checkpoint does not hold it)."""
        return load_umt5(self.cfg.text_encoder, self.cfg.text_len, self.dtype).to(self.device)

    def saved_text_encoder(self, text_encoder: TextEncoder) -> None:
        """What a checkpoint keeps of the text encoder: nothing (UMT5 stays in its directory)."""
        return None

    def exact_teacher(self, text_encoder: TextEncoder):
        raise cv.CausVidError("--exact-teacher exists for the toy world only (--tiny); drop it")

    # frames and the DiT's space: the VAE, loaded when first needed

    pixel_frames = staticmethod(pixel_frames)
    latent_frames = staticmethod(latent_frames)

    @property
    def vae(self) -> "WanVAE":
        if self._vae is None:
            self.check_pixels()
            self._vae = WanVAE(self.cfg.vae, self.device, self.dtype)
        return self._vae

    def fork(self) -> "WanWorld":
        """The same world for one more stream made at once: its own VAE cache (the weights
        shared; the VAE is loaded first if it was not)."""
        other = copy.copy(self)
        other._vae = self.vae.fork()
        return other

    def check_pixels(self):
        """Wan's frames go through its VAE: say so before any model is loaded."""
        if not self.cfg.vae:
            raise cv.CausVidError("Wan's frames go through its VAE: pass --model-dir (or --vae)")

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (B, 1 + 4k, H, W, 3) -> normalised latents (B, 1 + k, C, H / 8, W / 8)."""
        return self.vae.encode(unit(frames).to(self.device)).float()

    def encode_stream(self, pieces, chunk: int):
        """uint8 pixels arriving in pieces of any length -> latent chunks of `chunk` frames."""
        return self.vae.encode_stream((unit(p).to(self.device) for p in pieces), chunk)

    def decode_stream(self, chunks):
        """Latent chunks -> uint8 pixels on the CPU, chunk by chunk
        (one frame, then four a latent)."""
        for x in self.vae.decode_stream(chunks):
            pixels = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            yield pixels.movedim(-3, -1).cpu()

    # videos to train on

    def training_videos(self, pairs):
        """Alg. 1 line 4's videos: the teacher's ODE end points stand in for a video dataset.
        -> (draw(rng) -> (x0, prompts), every prompt)."""
        if not len(pairs):
            raise cv.CausVidError(f"no ODE pairs in {pairs.path!r}; run train_ode.py first")

        def draw(rng):  # reads only the end points it draws
            i = torch.randint(0, len(pairs), (self.cfg.batch_size,), generator=rng)
            return pairs.get(i, state=-1), [pairs.prompts[j] for j in i]

        return draw, pairs.prompts

    score = None  # nothing to score Wan's videos against


def unit(frames: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (..., F, H, W, 3) -> floats in [-1, 1] (..., F, 3, H, W), what the VAE takes."""
    return frames.movedim(-1, -3).float() / 127.5 - 1
