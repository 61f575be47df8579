"""Tiled VAE decode and encode: overlapping tiles, each run alone, blended with linear ramps where they overlap.

The geometry is diffusers' `AutoencoderKL.enable_tiling()` (tiles of the VAE's sample size, a quarter of each
tile overlapping its neighbours; each tile is blended into the one above and the one to its left, then cut to
the part it owns), so a tiled picture stays close to diffusers' tiled one. Peak memory follows the tile, not
the picture. One difference: a tile that would run past the picture's right or bottom edge (diffusers cuts it
short) is moved back inside, full size, and only its part from diffusers' position on is used. Every tile then
has one shape: GPU providers plan their convolutions again for each new input shape, and with tiles of 4
shapes in turn that re-planning cost more than the decoding. The edge tiles also see more of the picture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np

TilingMode = Literal["auto", "on", "off"]
TILING_MODES: tuple[str, ...] = ("auto", "on", "off")
OVERLAP = 0.25  # share of a tile that overlaps the next one
# "auto" tiles pictures of at least 4 tiles and at least 1024 x 1024 pixels (SD 1.x: from 1024 x 1024, SDXL: from
# 2048 x 2048); smaller ones decode whole, as diffusers does by default.
AUTO_TILES = 4
AUTO_MIN_PIXELS = 1024 * 1024
MIN_TILE_SIZE = 128  # pixels per side of a tile (--vae-tile-size) at least: 16 latent pixels for SD


@dataclass(frozen=True)
class Tiles:
    """Tiles of `size_in` input pixels mapped by `scale` (8 for a decoder, 1/8 for an encoder)."""

    size_in: int  # input pixels per tile side
    size_out: int  # output pixels per tile side

    @property
    def stride(self) -> int:  # input pixels from one tile to the next
        return int(self.size_in * (1 - OVERLAP))

    @property
    def blend(self) -> int:  # output pixels blended between neighbours
        return int(self.size_out * OVERLAP)

    @property
    def keep(self) -> int:  # output pixels each tile owns
        return self.size_out - self.blend


def _blend_rows(above: np.ndarray, tile: np.ndarray, n: int) -> None:
    """Ramp the first n rows of `tile` from `above`'s last n rows to its own (in place). (B, C, H, W)"""
    n = min(n, above.shape[2], tile.shape[2])
    ramp = (np.arange(n, dtype=np.float32) / n)[:, None]  # (n, 1): weight of `tile`
    tile[:, :, :n] = above[:, :, above.shape[2] - n:] * (1 - ramp) + tile[:, :, :n] * ramp


def _blend_columns(left: np.ndarray, tile: np.ndarray, n: int) -> None:
    n = min(n, left.shape[3], tile.shape[3])
    ramp = np.arange(n, dtype=np.float32) / n  # (n,)
    tile[:, :, :, :n] = left[:, :, :, left.shape[3] - n:] * (1 - ramp) + tile[:, :, :, :n] * ramp


def tiled(x: np.ndarray, run: Callable[[np.ndarray], np.ndarray], tiles: Tiles) -> np.ndarray:
    """`run` over overlapping tiles of x (B, C, H, W), blended into one output (B, C', H*s, W*s)."""
    height, width = x.shape[2:]
    scale = tiles.size_out / tiles.size_in
    rows: list[list[np.ndarray]] = []
    for top in range(0, height, tiles.stride):
        # each tile is run full size, moved back inside the picture where it would pass an edge
        inside_top = min(top, max(height - tiles.size_in, 0))
        skip_rows = round((top - inside_top) * scale)
        row: list[np.ndarray] = []
        for left in range(0, width, tiles.stride):
            inside_left = min(left, max(width - tiles.size_in, 0))
            out = run(x[:, :, inside_top:inside_top + tiles.size_in, inside_left:inside_left + tiles.size_in])
            skip_columns = round((left - inside_left) * scale)
            tile = np.array(out[:, :, skip_rows:, skip_columns:], dtype=np.float32)  # from diffusers' position
            if rows:
                _blend_rows(rows[-1][len(row)], tile, tiles.blend)
            if row:
                _blend_columns(row[-1], tile, tiles.blend)
            row.append(tile)
        rows.append(row)
    out_h, out_w = round(height * scale), round(width * scale)
    joined = np.concatenate([np.concatenate([t[:, :, :tiles.keep, :tiles.keep] for t in row], axis=3)
                             for row in rows], axis=2)
    return joined[:, :, :out_h, :out_w]


def should_tile(mode: TilingMode, width: int, height: int, sample_size: int) -> bool:
    """Whether a picture of width x height is decoded in tiles of the VAE's `sample_size` pixels."""
    if mode == "auto":
        return width * height >= max(AUTO_TILES * sample_size * sample_size, AUTO_MIN_PIXELS)
    return mode == "on" and max(width, height) > sample_size


def decode_latents(z: np.ndarray, decode: Callable[[np.ndarray], np.ndarray], sample_size: int, factor: int,
                   mode: TilingMode) -> np.ndarray:
    """One picture's latents z (1, C, h, w), already divided by the VAE's scaling factor -> pixels (1, 3, H, W),
    whole or in tiles of `sample_size` pixels (`factor` pixels per latent pixel)."""
    if should_tile(mode, z.shape[3] * factor, z.shape[2] * factor, sample_size):
        return tiled(z, decode, Tiles(size_in=sample_size // factor, size_out=sample_size))
    return decode(z)


def encode_pixels(x: np.ndarray, encode: Callable[[np.ndarray], np.ndarray], sample_size: int, factor: int,
                  mode: TilingMode) -> np.ndarray:
    """Pixels x (1, 3, H, W) -> the encoder's output (1, 2C, H/f, W/f), whole or in tiles."""
    if should_tile(mode, x.shape[3], x.shape[2], sample_size):
        return tiled(x, encode, Tiles(size_in=sample_size, size_out=sample_size // factor))
    return encode(x)
