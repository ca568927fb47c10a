"""Generative models (diffusers-native): the histology VAE and helpers."""

from genpath.models.vae import build_vae, decode_tiled, encode_tiled, load_vae

__all__ = ["build_vae", "decode_tiled", "encode_tiled", "load_vae"]
