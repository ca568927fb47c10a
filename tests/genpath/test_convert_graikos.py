"""genpath convert graikos-ldm: Graikos et al.'s CompVis latent diffusion layout -> genpath synth.

The reference below is a transcription of the published code (cvlab-stonybrook/Large-Image-Diffusion:
``ldm/modules/diffusionmodules/openaimodel.py`` UNetModel, ``ldm/modules/attention.py`` SpatialTransformer,
``ldm/modules/diffusionmodules/model.py`` Encoder/Decoder, taming's VectorQuantizer2 behind
``ldm/models/autoencoder.py`` VQModelInterface, ``ldm/modules/encoders/modules.py`` PatchEmbedder/SSLEmbedder,
``ldm/models/diffusion/ddpm.py`` register_schedule/decode_first_stage, ``ldm/models/diffusion/plms.py``
PLMSSampler, ``notebooks/brca_patch_synthesis.ipynb`` zero-embedding guidance), independent of genpath and
diffusers. Tiny widths; the checkpoint is saved as Lightning 1.4 saves it (``state_dict`` with the
``model.diffusion_model.`` / ``first_stage_model.`` / ``cond_stage_model.`` prefixes and the schedule buffers,
``callbacks`` keyed by the ModelCheckpoint class) next to a project YAML in their format.
"""

import json
import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import typer
import yaml
from torch import nn
from typer.testing import CliRunner

from genpath.apps.convert_graikos import convert_graikos_ldm
from genpath.cli.convert_graikos import graikos_ldm
from genpath.models.linear_projector import LinearEmbeddingProjector
from genpath.pipelines.convert_graikos import genpath_guidance, load_graikos_ldm
from genpath.pipelines.embedding_to_image import EmbeddingToImagePipeline

runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is fastest, and much faster than two on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# reference: openaimodel.UNetModel with SpatialTransformer (use_spatial_transformer=True) -----------

def timestep_embedding(timesteps, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def normalization(channels):  # GroupNorm32
    return nn.GroupNorm(32, channels)


class TimestepBlock(nn.Module):
    pass


class ResBlock(TimestepBlock):
    def __init__(self, channels, emb_channels, out_channels=None):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(normalization(out_channels), nn.SiLU(), nn.Dropout(p=0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class CrossAttention(nn.Module):
    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = context_dim or query_dim
        self.scale = dim_head ** -0.5
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        h = self.heads
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.reshape(t.shape[0], t.shape[1], h, -1).permute(0, 2, 1, 3).reshape(t.shape[0] * h, t.shape[1], -1)
                   for t in (q, k, v))
        sim = torch.einsum("b i d, b j d -> b i j", q, k) * self.scale
        out = torch.einsum("b i j, b j d -> b i d", sim.softmax(dim=-1), v)
        n, d = out.shape[1], out.shape[2]
        out = out.reshape(-1, h, n, d).permute(0, 2, 1, 3).reshape(-1, n, h * d)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, n_heads, d_head, context_dim):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, in_channels, n_heads, d_head, depth, context_dim):
        super().__init__()
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.proj_in = nn.Conv2d(in_channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner_dim, n_heads, d_head, context_dim) for _ in range(depth)])
        self.proj_out = nn.Conv2d(inner_dim, in_channels, 1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        x_in = x
        x = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            x = block(x, context)
        return self.proj_out(x.transpose(1, 2).reshape(b, -1, h, w)) + x_in


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 channel_mult, num_heads=-1, num_head_channels=-1, use_spatial_transformer=True, transformer_depth=1,
                 context_dim=None, legacy=True, **training_only):
        super().__init__()
        assert use_spatial_transformer
        self.model_channels = model_channels
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_embed_dim), nn.SiLU(),
                                        nn.Linear(time_embed_dim, time_embed_dim))

        def attention(ch):
            heads = num_heads if num_head_channels == -1 else ch // num_head_channels
            return SpatialTransformer(ch, heads, ch // heads, transformer_depth, context_dim)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        input_block_chans, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, time_embed_dim, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                input_block_chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(ResBlock(ch, time_embed_dim), attention(ch),
                                                    ResBlock(ch, time_embed_dim))
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + input_block_chans.pop(), time_embed_dim, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1))

    def forward(self, x, timesteps, context):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        hs, h = [], x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)


# reference: model.py Encoder/Decoder, taming VectorQuantizer2, VQModelInterface -------------------

def Normalize(in_channels):  # noqa: N802 - the published name
    return nn.GroupNorm(32, in_channels, eps=1e-6)


def nonlinearity(x):
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        return (self.nin_shortcut(x) if self.in_channels != self.out_channels else x) + h


class AttnBlock(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.norm = Normalize(in_channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(in_channels, in_channels, 1) for _ in range(4))

    def forward(self, x):
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        w_ = torch.bmm(q.reshape(b, c, h * w).permute(0, 2, 1), k.reshape(b, c, h * w)) * (int(c) ** (-0.5))
        w_ = F.softmax(w_, dim=2).permute(0, 2, 1)
        h_ = torch.bmm(v.reshape(b, c, h * w), w_).reshape(b, c, h, w)
        return x + self.proj_out(h_)


class VDownsample(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class VUpsample(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(block_in):
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(block_in, block_in), AttnBlock(block_in), ResnetBlock(block_in,
                                                                                                             block_in)
    return mid


class Encoder(nn.Module):
    def __init__(self, *, ch, ch_mult, num_res_blocks, in_channels, z_channels, **ignore):
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block, block_in = nn.ModuleList(), ch * in_ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(block_in, ch * ch_mult[i_level]))
                block_in = ch * ch_mult[i_level]
            down = nn.Module()
            down.block, down.attn = block, nn.ModuleList()
            if i_level != self.num_resolutions - 1:
                down.downsample = VDownsample(block_in)
            self.down.append(down)
        self.mid = _mid(block_in)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for i_level in range(self.num_resolutions):
            for i_block in range(self.num_res_blocks):
                h = self.down[i_level].block[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = self.down[i_level].downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(nonlinearity(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, *, ch, out_ch, ch_mult, num_res_blocks, z_channels, **ignore):
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(block_in, ch * ch_mult[i_level]))
                block_in = ch * ch_mult[i_level]
            up = nn.Module()
            up.block, up.attn = block, nn.ModuleList()
            if i_level != 0:
                up.upsample = VUpsample(block_in)
            self.up.insert(0, up)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i_level in reversed(range(self.num_resolutions)):
            for i_block in range(self.num_res_blocks + 1):
                h = self.up[i_level].block[i_block](h)
            if i_level != 0:
                h = self.up[i_level].upsample(h)
        return self.conv_out(nonlinearity(self.norm_out(h)))


class VectorQuantizer2(nn.Module):
    def __init__(self, n_e, e_dim):
        super().__init__()
        self.e_dim = e_dim
        self.embedding = nn.Embedding(n_e, e_dim)

    def forward(self, z):
        z = z.permute(0, 2, 3, 1).contiguous()
        z_flattened = z.view(-1, self.e_dim)
        d = (torch.sum(z_flattened ** 2, dim=1, keepdim=True) + torch.sum(self.embedding.weight ** 2, dim=1)
             - 2 * torch.einsum("bd,dn->bn", z_flattened, self.embedding.weight.t()))
        z_q = self.embedding(torch.argmin(d, dim=1)).view(z.shape)
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2).contiguous()


class VQModelInterface(nn.Module):
    def __init__(self, ddconfig, n_embed, embed_dim, **ignore):
        super().__init__()
        self.encoder, self.decoder = Encoder(**ddconfig), Decoder(**ddconfig)
        self.quantize = VectorQuantizer2(n_embed, embed_dim)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def encode(self, x):
        return self.quant_conv(self.encoder(x))

    def decode(self, h):
        return self.decoder(self.post_quant_conv(self.quantize(h)))


# reference: encoders/modules.py, ddpm.py LatentDiffusion, plms.py --------------------------------

class PatchEmbedder(nn.Module):
    def __init__(self, patch_ssl_key="feat_patch", patch_embed_dim=768, target_dim=512, normalize_ssl=False):
        super().__init__()
        self.patch_ssl_key, self.normalize_ssl = patch_ssl_key, normalize_ssl
        self.patch_fc = nn.Linear(patch_embed_dim, target_dim)

    def forward(self, batch):
        patch_embed = batch[self.patch_ssl_key]
        if self.normalize_ssl:
            patch_embed = F.normalize(patch_embed, dim=-1)
        return self.patch_fc(patch_embed).unsqueeze(1)


class SSLEmbedder(nn.Module):
    def __init__(self, patch_ssl_key="feat_20x", region_ssl_key="feat_5x", patch_embed_dim=384, region_embed_dim=768,
                 normalize_ssl=False):
        super().__init__()
        self.patch_ssl_key, self.region_ssl_key, self.normalize_ssl = patch_ssl_key, region_ssl_key, normalize_ssl
        self.patch_fc = nn.Linear(patch_embed_dim, 512)
        self.region_fc = nn.Linear(region_embed_dim, 512)

    def forward(self, batch):
        patch_embed = batch[self.patch_ssl_key]
        region_embed = batch.get(self.region_ssl_key, torch.zeros((patch_embed.shape[0], 768)))  # as published
        if self.normalize_ssl:
            patch_embed, region_embed = F.normalize(patch_embed, dim=-1), F.normalize(region_embed, dim=-1)
        return torch.stack([self.patch_fc(patch_embed), self.region_fc(region_embed)], dim=1)


class FIDTracker(nn.Module):  # stands for LatentDiffusion.inception (track_fid), which sampling does not use
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)


class LatentDiffusion(nn.Module):
    def __init__(self, params):
        super().__init__()
        self.model = nn.Module()  # DiffusionWrapper
        self.model.diffusion_model = UNetModel(**params["unet_config"]["params"])
        first = params["first_stage_config"]["params"]
        self.first_stage_model = VQModelInterface(**first)
        cond = params["cond_stage_config"]
        self.cond_stage_model = {"ldm.modules.encoders.modules.PatchEmbedder": PatchEmbedder,
                                 "ldm.modules.encoders.modules.SSLEmbedder": SSLEmbedder}[cond["target"]](
            **cond.get("params", {}))
        if params.get("track_fid", True):
            self.inception = FIDTracker()
        self.scale_factor = params.get("scale_factor", 1.0)
        betas = (torch.linspace(params["linear_start"] ** 0.5, params["linear_end"] ** 0.5, params["timesteps"],
                                dtype=torch.float64) ** 2).numpy()
        alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        to_torch = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        for name, value in (("betas", betas), ("alphas_cumprod", alphas_cumprod),
                            ("alphas_cumprod_prev", alphas_cumprod_prev),
                            ("sqrt_alphas_cumprod", np.sqrt(alphas_cumprod)),
                            ("sqrt_one_minus_alphas_cumprod", np.sqrt(1.0 - alphas_cumprod)),
                            ("log_one_minus_alphas_cumprod", np.log(1.0 - alphas_cumprod)),
                            ("sqrt_recip_alphas_cumprod", np.sqrt(1.0 / alphas_cumprod)),
                            ("sqrt_recipm1_alphas_cumprod", np.sqrt(1.0 / alphas_cumprod - 1)),
                            ("posterior_variance", posterior_variance),
                            ("posterior_log_variance_clipped", np.log(np.maximum(posterior_variance, 1e-20))),
                            ("posterior_mean_coef1", betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)),
                            ("posterior_mean_coef2",
                             (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod))):
            self.register_buffer(name, to_torch(value))

    def apply_model(self, x, t, c):
        return self.model.diffusion_model(x, t, context=c)

    def get_learned_conditioning(self, batch):
        return self.cond_stage_model(batch)

    def decode_first_stage(self, z):
        return self.first_stage_model.decode(1.0 / self.scale_factor * z)


def plms_sample(model, cond, uncond, scale, steps, x_T):
    """PLMSSampler.sample(S=steps, eta=0, x_T=x_T, unconditional_guidance_scale=scale, ...)."""
    T = model.alphas_cumprod.shape[0]
    ddim_timesteps = np.asarray(list(range(0, T, T // steps))) + 1
    alphacums = model.alphas_cumprod
    alphas = alphacums[ddim_timesteps]
    alphas_prev = torch.tensor(np.asarray([alphacums[0]] + alphacums[ddim_timesteps[:-1]].tolist()))
    sqrt_one_minus_alphas = torch.sqrt(1.0 - alphas)
    b = x_T.shape[0]

    def get_model_output(x, t):
        if uncond is None or scale == 1.0:
            return model.apply_model(x, t, cond)
        e_t_uncond, e_t = model.apply_model(torch.cat([x] * 2), torch.cat([t] * 2), torch.cat([uncond, cond])).chunk(2)
        return e_t_uncond + scale * (e_t - e_t_uncond)

    def get_x_prev_and_pred_x0(x, e_t, index):
        a_t = torch.full((b, 1, 1, 1), float(alphas[index]))
        a_prev = torch.full((b, 1, 1, 1), float(alphas_prev[index]))
        sqrt_one_minus_at = torch.full((b, 1, 1, 1), float(sqrt_one_minus_alphas[index]))
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev).sqrt() * e_t
        return a_prev.sqrt() * pred_x0 + dir_xt

    img, old_eps = x_T, []
    time_range = np.flip(ddim_timesteps)
    for i, step in enumerate(time_range):
        index = len(time_range) - i - 1
        ts = torch.full((b,), int(step), dtype=torch.long)
        ts_next = torch.full((b,), int(time_range[min(i + 1, len(time_range) - 1)]), dtype=torch.long)
        e_t = get_model_output(img, ts)
        if len(old_eps) == 0:
            x_prev = get_x_prev_and_pred_x0(img, e_t, index)
            e_t_prime = (e_t + get_model_output(x_prev, ts_next)) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        img = get_x_prev_and_pred_x0(img, e_t_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
    return img


# the published layout: project YAML, Lightning 1.4 checkpoint ------------------------------------

CONDITIONERS = {
    "patch": ("ldm.modules.encoders.modules.PatchEmbedder",
              {"patch_ssl_key": "feat_patch", "patch_embed_dim": 24, "normalize_ssl": True}),
    "ssl": ("ldm.modules.encoders.modules.SSLEmbedder",
            {"patch_ssl_key": "feat_20x", "region_ssl_key": "feat_5x", "patch_embed_dim": 384,
             "region_embed_dim": 768, "normalize_ssl": True}),
}


def project_config(kind="patch", use_ema=False, track_fid=False, heads=None):
    """configs/latent-diffusion/crc/only_patch_20x.yaml (brca/only_ssl.yaml for "ssl"), widths and depths shrunk."""
    target, cond_params = CONDITIONERS[kind]
    params = {
        "linear_start": 0.0015, "linear_end": 0.0195, "num_timesteps_cond": 1, "log_every_t": 200, "timesteps": 1000,
        "first_stage_key": "image", "cond_stage_key": "hybrid", "image_size": 8, "channels": 3,
        "cond_stage_trainable": True, "conditioning_key": "crossattn", "use_ema": use_ema,
        "scheduler_config": {"target": "ldm.lr_scheduler.LambdaLinearScheduler",
                             "params": {"warm_up_steps": [1000], "cycle_lengths": [10000000000000],
                                        "f_start": [1.0e-6], "f_max": [1.0], "f_min": [1.0]}},
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "use_checkpoint": True, "use_fp16": True, "image_size": 8, "in_channels": 3, "out_channels": 3,
            "model_channels": 32, "attention_resolutions": [4, 2] if kind == "patch" else [4, 2, 1],
            "num_res_blocks": 1 if kind == "patch" else 2, "channel_mult": [1, 2, 2],
            "num_heads": heads or (1 if kind == "patch" else 2),
            "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 512,
            "ckpt_path": "/home/user/latent-diffusion/models/ldm/cin256-v2/unet.ckpt"}},
        "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
            "ckpt_path": "/home/user/latent-diffusion/models/first_stage_models/vq-f4/model.ckpt",
            "embed_dim": 3, "n_embed": 64,
            "ddconfig": {"double_z": False, "z_channels": 3, "resolution": 32, "in_channels": 3, "out_ch": 3,
                         "ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1 if kind == "patch" else 2,
                         "attn_resolutions": [], "dropout": 0.0},
            "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": {"target": target, "params": dict(cond_params)},
    }
    if not track_fid:
        params["track_fid"] = False
    return {"model": {"base_learning_rate": "1e-4", "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                      "params": params},
            "data": {"target": "main.DataModuleFromConfig", "params": {"batch_size": 100, "num_workers": 16}},
            "lightning": {"trainer": {"benchmark": True, "precision": 16}}}


def randomize(module, seed):
    """Random weights everywhere (the published initialisation zeroes some output convolutions)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.weight[0].numel()))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, nn.Embedding):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
    return module.eval()


class fake_lightning:  # noqa: N801 - a context manager
    """``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`` for torch.save, gone afterwards."""

    NAMES = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")

    def __enter__(self):
        assert not any(n in sys.modules for n in self.NAMES)
        for name in self.NAMES:
            sys.modules[name] = types.ModuleType(name)
        cls = type("ModelCheckpoint", (), {"__module__": self.NAMES[-1]})
        sys.modules[self.NAMES[-1]].ModelCheckpoint = cls
        return cls

    def __exit__(self, *exc):
        for name in self.NAMES:
            sys.modules.pop(name, None)


def save_lightning(path, state_dict, **extra):
    """Save as Lightning 1.4's dump_checkpoint does (callbacks keyed by the callback class)."""
    with fake_lightning() as ModelCheckpoint:
        torch.save({"epoch": 3, "global_step": 120000, "pytorch-lightning_version": "1.4.2",
                    "state_dict": state_dict,
                    "callbacks": {ModelCheckpoint: {"monitor": None, "best_model_score": None, "best_model_path": "",
                                                    "current_score": None, "dirpath": "logs/run/checkpoints"}},
                    "optimizer_states": [{"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(2)}},
                                          "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8,
                                                            "weight_decay": 0.01, "amsgrad": False, "params": [0]}]}],
                    "lr_schedulers": [{"base_lrs": [1e-4], "last_epoch": 5, "_step_count": 6, "verbose": False,
                                       "_last_lr": [1e-4], "lr_lambdas": [{}]}],
                    "native_amp_scaling_state": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 10},
                    **extra}, path)


def make_model(tmp, kind="patch", seed=0, **config_kw):
    """A reference LatentDiffusion with random weights, its project YAML and last.ckpt in ``tmp``."""
    config = project_config(kind, **config_kw)
    ref = randomize(LatentDiffusion(config["model"]["params"]), seed)
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "project.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    save_lightning(tmp / "last.ckpt", ref.state_dict())
    return ref, config, tmp / "last.ckpt", tmp / "project.yaml"


@pytest.fixture(scope="module", params=["patch", "ssl"])
def converted(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"graikos_{request.param}")
    ref, config, ckpt, yml = make_model(tmp, request.param, seed=1, track_fid=request.param == "ssl")
    record = convert_graikos_ldm(ckpt, yml, tmp / "converted")
    return request.param, ref, tmp / "converted", record


def conditions(kind, n, seed=3):
    g = torch.Generator().manual_seed(seed)
    if kind == "patch":
        return {"feat_patch": torch.randn(n, 24, generator=g)}, "feat_patch"
    return {"feat_20x": torch.randn(n, 384, generator=g), "feat_5x": torch.randn(n, 768, generator=g)}, None


def genpath_input(kind, batch):
    return batch["feat_patch"] if kind == "patch" else torch.cat([batch["feat_20x"], batch["feat_5x"]], 1)


# tests ---------------------------------------------------------------------------------------------

def test_parts_match_the_reference(converted):
    kind, ref, out, record = converted
    pipe = EmbeddingToImagePipeline.from_pretrained(out)
    assert type(pipe.vae).__name__ == "VQModel" and isinstance(pipe.projector, LinearEmbeddingProjector)
    assert record["stand_ins"] == ["pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"]
    assert any(k.startswith("inception.") for k in record["ignored"]) == (kind == "ssl")
    batch, _ = conditions(kind, 2)
    with torch.no_grad():
        tokens = pipe.projector(genpath_input(kind, batch))
        zeros = {k: torch.zeros_like(v) for k, v in batch.items()}
        torch.testing.assert_close(tokens, ref.get_learned_conditioning(batch), atol=1e-6, rtol=0)
        torch.testing.assert_close(pipe.projector.null_tokens(2), ref.get_learned_conditioning(zeros), atol=0, rtol=0)
        g = torch.Generator().manual_seed(4)
        x, t = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([981, 21])
        torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=tokens).sample,
                                   ref.apply_model(x, t, tokens), atol=1e-5, rtol=1e-5)
        img = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
        torch.testing.assert_close(pipe.vae.encode(img).latents, ref.first_stage_model.encode(img), atol=1e-5, rtol=0)
        torch.testing.assert_close(pipe.vae.decode(x).sample, ref.decode_first_stage(x), atol=1e-5, rtol=0)
    if kind == "ssl":  # only the patch embedding: the region token is region_fc's bias, as SSLEmbedder does
        with torch.no_grad():
            only = pipe.projector(batch["feat_20x"])
            torch.testing.assert_close(only, ref.get_learned_conditioning({"feat_20x": batch["feat_20x"]}), atol=1e-6,
                                       rtol=0)


def test_sampling_matches_published_plms(converted):
    from genpath.models.vae import decode_tiled

    kind, ref, out, _ = converted
    pipe = EmbeddingToImagePipeline.from_pretrained(out)
    batch, _ = conditions(kind, 2)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():  # their notebook: cond from the batch, uncond from zero embeddings, PLMS, scale 2
        cc = ref.get_learned_conditioning(batch)
        uc = ref.get_learned_conditioning({k: torch.zeros_like(v) for k, v in batch.items()})
        z = plms_sample(ref, cc, uc, 2.0, steps=5, x_T=x_T)
        want = torch.clamp((ref.decode_first_stage(z) + 1.0) / 2.0, min=0.0, max=1.0)
        latents = pipe(genpath_input(kind, batch), num_inference_steps=5, guidance_scale=2.0, latents=x_T,
                       output_type="latent").images
        images = decode_tiled(pipe.vae, latents)  # the pipeline's own decoding step
    assert (z - x_T).abs().max() > 0.1 and want.std() > 0.05  # a non-trivial run
    torch.testing.assert_close(latents, z, atol=1e-4, rtol=1e-5)  # latents reach ~50 with random weights
    torch.testing.assert_close(images, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("converted", ["patch"], indirect=True)
def test_genpath_synth_runs_the_folder(converted, tmp_path):
    from genpath.synth import SynthConfig, run_synth

    kind, ref, out, _ = converted
    batch, _ = conditions(kind, 2)
    np.save(tmp_path / "emb.npy", genpath_input(kind, batch).numpy())
    # steps must divide their 1000 timesteps: PLMSSampler(S) runs len(range(0, 1000, 1000 // S)) steps
    rows = run_synth(SynthConfig(model=str(out), out=str(tmp_path / "run"), embeddings=str(tmp_path / "emb.npy"),
                                 n_per_condition=1, steps=5, guidance=2.0, seed=11, batch_size=2))
    assert [r["status"] for r in rows] == ["done"] * 2
    import zarr

    got = zarr.open_group(str(tmp_path / "run" / "images.zarr"), mode="r")["images"][:]
    x_T = torch.cat([torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(11 + i)) for i in range(2)])
    with torch.no_grad():
        cc = ref.get_learned_conditioning(batch)
        uc = ref.get_learned_conditioning({k: torch.zeros_like(v) for k, v in batch.items()})
        want = torch.clamp((ref.decode_first_stage(plms_sample(ref, cc, uc, 2.0, 5, x_T)) + 1) / 2, 0, 1)
    assert np.abs(got.astype(int) - (want * 255).round().numpy().astype(int)).max() <= 1


def test_ema_weights_are_used_when_the_config_says_so(tmp_path):
    config = project_config("patch", use_ema=True)
    ref = randomize(LatentDiffusion(config["model"]["params"]), 5)
    ema_unet = randomize(UNetModel(**config["model"]["params"]["unet_config"]["params"]), 6)
    sd = ref.state_dict()
    for name, value in ema_unet.named_parameters():  # LitEma: the name without dots
        sd["model_ema." + ("diffusion_model." + name).replace(".", "")] = value.detach().clone()
    sd["model_ema.decay"], sd["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(1000, dtype=torch.int)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    save_lightning(tmp_path / "last.ckpt", sd)
    pipe, record = load_graikos_ldm(tmp_path / "last.ckpt", tmp_path / "p.yaml")
    assert record["ema"] is True
    x, t, c = torch.randn(1, 3, 8, 8), torch.tensor([501]), torch.randn(1, 1, 512)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=c).sample, ema_unet(x, t, c), atol=1e-5,
                                   rtol=1e-5)
    config["model"]["params"]["use_ema"] = False  # the raw weights; the EMA ones are ignored
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    pipe, record = load_graikos_ldm(tmp_path / "last.ckpt", tmp_path / "p.yaml")
    assert record["ema"] is False and any(k.startswith("model_ema") for k in record["ignored"])
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=c).sample, ref.apply_model(x, t, c),
                                   atol=1e-5, rtol=1e-5)


PUBLISHED_CRC = """
model:
  base_learning_rate: 1e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0195
    timesteps: 1000
    image_size: 64
    channels: 3
    cond_stage_trainable: true
    conditioning_key: crossattn
    use_ema: False
    track_fid: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        use_fp16: True
        image_size: 64
        in_channels: 3
        out_channels: 3
        model_channels: 192
        attention_resolutions: [8, 4, 2]
        num_res_blocks: 2
        channel_mult: [ 1,2,3,5 ]
        num_heads: 1
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 512
        ckpt_path: "/home/myellapragad/summer23/latent-diffusion/models/ldm/cin256-v2/unet.ckpt"
    first_stage_config:
      target: ldm.models.autoencoder.VQModelInterface
      params:
        ckpt_path: "/home/myellapragad/summer23/latent-diffusion/models/first_stage_models/vq-f4/model.ckpt"
        embed_dim: 3
        n_embed: 8192
        ddconfig:
          double_z: false
          z_channels: 3
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult:
          - 1
          - 2
          - 4
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.PatchEmbedder
      params:
        patch_ssl_key: "feat_patch"
        patch_embed_dim: 768
        normalize_ssl: True
"""


def test_published_config_translates(tmp_path):
    from genpath.pipelines.graikos_config import read_graikos_config

    (tmp_path / "crc.yaml").write_text(PUBLISHED_CRC)  # configs/latent-diffusion/crc/only_patch_20x.yaml (model part)
    cfg = read_graikos_config(tmp_path / "crc.yaml")
    assert cfg.unet["block_out_channels"] == (192, 384, 576, 960)
    assert cfg.unet["down_block_types"] == ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3
    assert cfg.unet["up_block_types"] == ("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",)
    assert cfg.unet["attention_head_dim"] == (1, 1, 1, 1) and cfg.unet["cross_attention_dim"] == 512
    assert cfg.unet["sample_size"] == 64 and cfg.unet["layers_per_block"] == 2
    assert cfg.vae["block_out_channels"] == (128, 256, 512) and cfg.vae["num_vq_embeddings"] == 8192
    assert cfg.vae["scaling_factor"] == 1.0 and cfg.vae["latent_channels"] == 3 == cfg.vae["vq_embed_dim"]
    assert (cfg.conditioner, cfg.embed_dims, cfg.normalize, cfg.use_ema) == ("PatchEmbedder", (768,), True, False)
    assert (cfg.timesteps, cfg.linear_start, cfg.linear_end) == (1000, 0.0015, 0.0195)


def test_guidance_conventions():
    assert genpath_guidance(2.0) == 2.0  # unconditional_guidance_scale of their PLMS/DDIM samplers
    assert genpath_guidance(3.0, "panorama") == 4.0  # get_panorama: (1 + g) * cond - g * uncond
    u, c = torch.randn(4), torch.randn(4)
    w = genpath_guidance(3.0, "panorama")
    torch.testing.assert_close(u + w * (c - u), (1 + 3.0) * c - 3.0 * u)
    with pytest.raises(ValueError, match="^convention: expected"):
        genpath_guidance(1.0, "other")


def test_cli_command(tmp_path):
    make_model(tmp_path, "patch", seed=2)
    app = typer.Typer()
    app.command("graikos-ldm")(graikos_ldm)
    app.command("other")(lambda: None)  # a group, as under `genpath convert`
    result = runner.invoke(app, ["graikos-ldm", str(tmp_path / "last.ckpt"), "--config", str(tmp_path / "project.yaml"),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "run: genpath synth --model" in result.output and "PatchEmbedder 24 -> 1 token" in result.output
    record = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert record["family"] == "graikos-ldm" and len(record["sha256"]) == 64
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["vae"] == ["diffusers", "VQModel"]
    again = runner.invoke(app, ["graikos-ldm", str(tmp_path / "last.ckpt"), "-c", str(tmp_path / "project.yaml"),
                                "-o", str(tmp_path / "out")])
    assert again.exit_code == 2 and "out: expected a new or empty folder" in again.output
    assert len(again.output.strip().splitlines()) == 1


# hostile inputs: one line naming the argument, nothing executed, nothing written ------------------

class Exec:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def _edit_yaml(path, edit):
    config = yaml.safe_load(path.read_text())
    edit(config["model"]["params"])
    path.write_text(yaml.safe_dump(config))


def load_sd(path):
    with fake_lightning():
        return torch.load(path, weights_only=False)["state_dict"]  # our own test file


def _edit_ckpt(path, edit):
    sd = load_sd(path)
    edit(sd)
    save_lightning(path, sd)


def _callback_instance(src):
    sd = load_sd(src)
    with fake_lightning() as ModelCheckpoint:
        torch.save({"state_dict": sd, "callbacks": {"checkpoint": ModelCheckpoint()}}, src)


def _unet(p):
    return p["unet_config"]["params"]


HOSTILE = {
    "missing checkpoint": (lambda s, c, m: s.unlink(), FileNotFoundError,
                           r"^src: expected a Lightning checkpoint \(\.ckpt\) file, got .*last\.ckpt \(missing\)$"),
    "checkpoint is a folder": (lambda s, c, m: (s.unlink(), s.mkdir()), FileNotFoundError, r"\(a folder\)$"),
    "pickle running code": (lambda s, c, m: torch.save({"state_dict": {}, "x": Exec(m)}, s), ValueError,
                            r"^src: .* naming the globals \['builtins\.exec'\] .*genpath never unpickles code$"),
    "legacy pickle running code": (lambda s, c, m: torch.save({"x": Exec(m)}, s, _use_new_zipfile_serialization=False),
                                   ValueError, r"^src: expected a Lightning checkpoint .* reads, got .*Unsupported "
                                               r"global: GLOBAL exec"),
    "callback instance": (lambda s, c, m: _callback_instance(s), ValueError, r"instantiates ModelCheckpoint"),
    "not a checkpoint": (lambda s, c, m: s.write_bytes(b"not a pickle"), ValueError,
                         r"^src: expected a Lightning checkpoint .*torch\.load\(weights_only=True\) reads"),
    "no tensors": (lambda s, c, m: torch.save({"epoch": 1}, s), ValueError,
                   r"^src: expected a state dict of tensors in .*, got non-tensor entries \['epoch'\]$"),
    "missing config": (lambda s, c, m: c.unlink(), FileNotFoundError, r"^--config: expected their project YAML file"),
    "yaml running code": (lambda s, c, m: c.write_text(f"model: !!python/object/apply:os.system ['touch {m}']\n"),
                          ValueError, r"^--config: expected a YAML file \(read with yaml\.safe_load\), got .*"
                                      r"ConstructorError"),
    "yaml not a mapping": (lambda s, c, m: c.write_text("- a\n- b\n"), ValueError,
                           r"^--config: expected model to be a mapping, got None$"),
    "KL first stage": (lambda s, c, m: _edit_yaml(c, lambda p: p["first_stage_config"].update(
        target="ldm.models.autoencoder.AutoencoderKL")), ValueError,
        r"^--config: expected model\.params\.first_stage_config\.target to be ldm\.models\.autoencoder\."
        r"VQModelInterface .*, got 'ldm\.models\.autoencoder\.AutoencoderKL'$"),
    "scale-shift UNet": (lambda s, c, m: _edit_yaml(c, lambda p: _unet(p).update(use_scale_shift_norm=True)),
                         ValueError, r"^--config: expected model\.params\.unet_config\.params\.use_scale_shift_norm "
                                     r"to be False"),
    "unknown UNet option": (lambda s, c, m: _edit_yaml(c, lambda p: _unet(p).update(foo=1)), ValueError,
                            r"unknown options \['foo'\]"),
    "x0-prediction": (lambda s, c, m: _edit_yaml(c, lambda p: p.update(parameterization="x0")), ValueError,
                     r"^--config: expected model\.params\.parameterization to be 'eps'"),
    "config of another model": (lambda s, c, m: _edit_yaml(c, lambda p: _unet(p).update(model_channels=64)),
                                ValueError, r"^src: expected UNet weights \(model\.diffusion_model\.\*\) that fit "
                                            r"--config, got .* of another shape .*; the checkpoint does not match"),
    "conditioner of another width": (lambda s, c, m: _edit_yaml(c, lambda p: p["cond_stage_config"]["params"].update(
        patch_embed_dim=32)), ValueError, r"^src: expected PatchEmbedder .* weights \(cond_stage_model\.\*\) that fit"),
    "missing weight": (lambda s, c, m: _edit_ckpt(s, lambda sd: sd.pop("model.diffusion_model.out.2.weight")),
                       ValueError, r"^src: expected UNet weights .* got 1 missing \['conv_out\.weight'\]"),
    "unknown weight": (lambda s, c, m: _edit_ckpt(s, lambda sd: sd.update({"foo.bar": torch.ones(1)})), ValueError,
                       r"^src: expected only LatentDiffusion keys .* got 1 others: \['foo\.bar'\]$"),
    "NaN weight": (lambda s, c, m: _edit_ckpt(s, lambda sd: sd["first_stage_model.decoder.conv_out.bias"].fill_(
        float("nan"))), ValueError, r"^src: expected finite weights, got NaN or inf in first stage"),
    "another schedule": (lambda s, c, m: _edit_yaml(c, lambda p: p.update(linear_end=0.012)), ValueError,
                         r"^src: expected the betas of --config's schedule \(linear 0\.0015\.\.0\.012"),
    "EMA missing": (lambda s, c, m: _edit_yaml(c, lambda p: p.update(use_ema=True)), ValueError,
                    r"^src: expected EMA weights model_ema\.\* for every UNet weight"),
}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("graikos_hostile")
    make_model(tmp, "patch", seed=9)
    return tmp


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_inputs_fail_in_one_line(case, published, tmp_path):
    import shutil

    src, config, marker = tmp_path / "last.ckpt", tmp_path / "project.yaml", tmp_path / "marker"
    shutil.copy(published / "last.ckpt", src)
    shutil.copy(published / "project.yaml", config)
    make, error, pattern = HOSTILE[case]
    make(src, config, marker)
    with pytest.raises(error) as info:
        convert_graikos_ldm(src, config, tmp_path / "out")
    message = str(info.value)
    assert "\n" not in message and len(message) < 600, message
    assert __import__("re").search(pattern, message), message
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_out_must_be_usable(published, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"^out: expected an output folder, got the existing file"):
        convert_graikos_ldm(published / "last.ckpt", published / "project.yaml", tmp_path / "file")
    with pytest.raises(ValueError, match=r"^out: expected a folder that does not hold src"):
        convert_graikos_ldm(published / "last.ckpt", published / "project.yaml", published, overwrite=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    convert_graikos_ldm(published / "last.ckpt", published / "project.yaml", tmp_path / "full", overwrite=True)
    assert not (tmp_path / "full" / "x").exists() and (tmp_path / "full" / "model_index.json").is_file()


def test_safetensors_of_the_same_keys(published, tmp_path):
    from safetensors.torch import save_file

    sd = load_sd(published / "last.ckpt")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "last.safetensors")
    pipe, record = load_graikos_ldm(tmp_path / "last.safetensors", published / "project.yaml")
    assert record["stand_ins"] == [] and isinstance(pipe, EmbeddingToImagePipeline)


def test_vq_tiled_decoding(converted):
    from genpath.models.vq import vq_decode_tiled

    _, _, out, _ = converted
    vq = EmbeddingToImagePipeline.from_pretrained(out).vae
    z = torch.randn(1, 3, 20, 12, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        whole = vq.decode(z).sample
        torch.testing.assert_close(vq_decode_tiled(vq, z, 80), whole, atol=0, rtol=0)  # one tile: decode itself
        tiled = vq_decode_tiled(vq, z, 32)  # 8-cell tiles, 2 cells of overlap, blended
    assert tiled.shape == whole.shape and torch.isfinite(tiled).all()
    assert (tiled - whole).abs().mean() < (whole - whole.mean()).abs().mean()  # the same image, seams aside
    with pytest.raises(ValueError, match=r"^tile: expected a positive multiple of the VQ factor 4, got 30$"):
        vq_decode_tiled(vq, z, 30)
