"""`scanner explain`: one image, the detector's view of it, as a PNG.

The picture (matplotlib, Agg canvas, headless):

- the image, downscaled for drawing only (the model always sees the decoded pixels);
- a semi-transparent heatmap: the **channel mean of the global feature map** F (7x7), which is the
  PSM's activation map `sum_c F_c` divided by C (same picks, same ranking), min-max normalised and
  bilinearly upsampled over the central square that the global view saw (dashed outline), i.e.
  mapped onto the original image exactly as PSM maps its windows back;
- the six selected patches, numbered in pick order: the 3x3-window picks (224 px boxes) in cyan and
  the 2x2-window picks (112 px boxes) in magenta;
- beside each number the patch token's attention weight in the fusion: the **last AFFM layer**,
  averaged over heads (nn.MultiheadAttention's default), with the global token as the query (its row
  of the (K+1)x(K+1) matrix, global token last). Only that token goes to the classifier head, so its
  last-layer row is the mix the score is read from; the weights shown sum to 1 minus the weight the
  global token keeps for itself, which the legend prints;
- a title with label, score, threshold and model id, and a footnote saying which backend gave the
  score and boxes and where the heatmap and attention came from.

Any backend: the torch Detector gives everything in one forward pass. Another backend
(`scanner.backends.load_backend`) gives score and boxes; when its output has no feature map or
attention, those come from the torch model of the same weights (its own forward pass, whose boxes
may differ from the backend's by precision), and the footnote says so.

Size: the PNG is always WIDTH_PX (1200) pixels wide; its height is TOP_PX + image height +
BOTTOM_PX, where the image is drawn 1160 px wide (aspect kept) or, when that would be taller than
MAX_IMAGE_PX (1400), 1400 px tall. `layout_for(width, height)` gives that geometry and maps
image pixels to PNG pixels (tests check the drawn boxes with it).
"""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from scanner.errors import ItemError, ScannerError

WIDTH_PX = 1200
DPI = 100
MARGIN_PX = 20
TOP_PX = 72
BOTTOM_PX = 172
BOTTOM_LINES = 8  # legend and footnote lines, 19 px each
MAX_IMAGE_PX = 1400
LINE_PX = 2  # box outline width in PNG pixels
HEAT_ALPHA = 0.45
HEAT_CMAP = "inferno"  # no pure cyan or magenta in it, so the boxes stay visible on the heatmap
# Box colour per window size (first: 3x3 windows / 224 px, second: 2x2 windows / 112 px), RGB.
GROUP_COLOURS: tuple[tuple[int, int, int], ...] = ((0, 255, 255), (255, 0, 255), (255, 255, 0), (255, 128, 0))
GROUP_COLOUR_NAMES = ("cyan", "magenta", "yellow", "orange")
MAX_READ_BYTES = 1 << 30


# ------------------------------------------------------------------------------------ reading ids


def split_member_id(item_id: str) -> tuple[str, str] | None:
    """`archive::member` -> (archive path, member part) when the part before some `::` is a local
    file; None for a plain path. The leftmost such split wins (ids are built as archive + '::' + name)."""
    start = 0
    while True:
        pos = item_id.find("::", start)
        if pos < 0:
            return None
        if pos > 0 and os.path.isfile(item_id[:pos]):
            return item_id[:pos], item_id[pos + 2 :]
        start = pos + 1


def read_id_bytes(item_id: str, max_bytes: int = MAX_READ_BYTES) -> bytes:
    """The bytes of the image a result id names: a local file, or a member of a local tar/zip archive
    (`a.tar::member`, read through the same member iteration as the scan, so `name#2` ids resolve).

    Raises ItemError (kind io, archive or too_large) when it cannot be read.
    """
    data = read_many_ids([item_id], max_bytes)[item_id]
    if isinstance(data, ItemError):
        raise data
    return data


def read_many_ids(ids: list[str], max_bytes: int = MAX_READ_BYTES) -> dict[str, bytes | ItemError]:
    """Bytes (or the ItemError saying why not) for each id; one pass over each archive named."""
    from scanner.sources.archives import iter_archive
    from scanner.sources.listing import local_archive_kind

    out: dict[str, bytes | ItemError] = {}
    wanted: dict[str, set[str]] = {}  # archive path -> member ids
    for item_id in ids:
        split = split_member_id(item_id)
        if split is None:
            out[item_id] = _read_file(item_id, max_bytes)
        else:
            wanted.setdefault(split[0], set()).add(item_id)
    for archive, members in wanted.items():
        kind = local_archive_kind(archive)
        if kind is None:
            for item_id in members:
                out[item_id] = ItemError("archive", f"{archive!r} is not a tar or zip archive")
            continue
        left = set(members)
        try:
            for item in iter_archive(archive, archive, kind, max_bytes):
                if item.id in left:
                    left.discard(item.id)
                    out[item.id] = item.data if item.data is not None else ItemError(*(item.error or ("archive", "no data")))
                    if not left:
                        break
        except OSError as exc:
            for item_id in left:
                out[item_id] = ItemError("io", f"cannot read archive: {exc.strerror or exc}")
            left = set()
        for item_id in left:
            out[item_id] = ItemError("archive", "no such member in the archive")
    return out


def _read_file(path: str, max_bytes: int) -> bytes | ItemError:
    if path.startswith(("http://", "https://", "s3://", "gs://", "memory://")):
        return ItemError("io", "not a local file (remote ids are not fetched)")
    if path.startswith("file://"):
        from scanner.sources import file_url_path

        path = file_url_path(path) or path
    try:
        if not os.path.isfile(path):
            return ItemError("io", "no such file" if not os.path.lexists(path) else "not a regular file")
        if os.path.getsize(path) > max_bytes:
            return ItemError("too_large", f"file is more than {max_bytes} bytes")
        with open(path, "rb") as fh:
            return fh.read(max_bytes + 1)
    except OSError as exc:
        return ItemError("io", f"cannot read file: {exc.strerror or exc}")


# ------------------------------------------------------------------------------------- explaining


@dataclass
class Explanation:
    """What the picture shows; coordinates are the decoded image's pixels.

    boxes:       int (K, 4) [x0, y0, x1, y1] from the backend that gave the score.
    groups:      int (K,) window-size index of each box (0: 3x3 windows, 1: 2x2 windows).
    heatmap:     float (h, w) channel mean of the global feature map, None when unavailable.
    attention:   float (K,) last AFFM layer, head-averaged, global token -> each patch token (the mean
                 over the model's heads where it has several).
    global_self: float, the weight the global token keeps for itself in that row.
    """

    image_id: str
    width: int
    height: int
    score: float
    label: str
    threshold: float
    model_id: str
    backend: str
    boxes: np.ndarray
    groups: np.ndarray
    patch_sizes: tuple[int, ...]
    windows: tuple[int, ...]
    heatmap: np.ndarray | None
    attention: np.ndarray | None
    global_self: float | None
    notes: list[str] = field(default_factory=list)


def box_groups(count: int, cfg) -> np.ndarray:
    """Window-size index of each of `count` boxes: PSM and random emit `picks_per_window` boxes per
    window size, in order; five_crop boxes are one group."""
    if cfg.patch_strategy == "five_crop":
        return np.zeros(count, dtype=np.int64)
    return np.minimum(np.arange(count) // max(1, cfg.picks_per_window), len(cfg.windows) - 1)


def _load_backend(name: str, model_path, threads: int | None, engines_dir):
    """The runner of a non-torch backend, from scanner.backends (absent in older installs)."""
    try:
        from scanner.backends import load_backend
    except ImportError:
        raise ScannerError(f"backend {name!r} is not available here (no scanner.backends); use --backend torch") from None
    loaded = load_backend(name, model_path, threads=threads, engines_dir=engines_dir)
    return loaded[0] if isinstance(loaded, tuple) else loaded  # some loaders return (runner, info)


def _to_numpy(t) -> np.ndarray:
    return t.detach().float().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float64)


@torch.no_grad()
def explain_image(image: torch.Tensor, model, info, *, image_id: str = "", runner=None, backend: str = "torch",
                  notes: list[str] | None = None) -> Explanation:
    """Score and explain one uint8 (3, H, W) image.

    model: the torch Detector of `info`'s weights. runner: another backend's callable
    `runner([image]) -> output with .logits, .boxes` (and optionally .fmap, .attention); None: torch.
    """
    notes = list(notes or [])
    cfg = info.config
    if runner is None:
        out = model([image], need_weights=True)
        main, ref = out, out
        notes.append("Score, label, boxes, heatmap and attention: one forward pass of the torch Detector.")
    else:
        main = runner([image])
        has_fmap = getattr(main, "fmap", None) is not None
        has_attn = getattr(main, "attention", None) is not None
        ref = main if has_fmap and has_attn else model([image], need_weights=True)
        if ref is main:
            notes.append(f"Score, label, boxes, heatmap and attention: the {backend} backend.")
        else:
            missing = [what for what, has in (("feature map", has_fmap), ("attention", has_attn)) if not has]
            taken = [what for what, has in (("heatmap", has_fmap), ("attention", has_attn)) if not has]
            notes.append(f"Score, label and boxes: the {backend} backend; it gives no {' or '.join(missing)}, so the "
                         f"{' and '.join(taken)} {'come' if len(taken) > 1 else 'comes'} from the torch Detector of the "
                         "same weights (its own forward pass; its boxes may differ slightly by precision).")
    score = float(torch.sigmoid(torch.as_tensor(main.logits).float().reshape(-1)[0]))
    boxes = np.asarray(torch.as_tensor(main.boxes)[0].cpu().long().numpy())  # (K, 4)
    fmap = main.fmap if getattr(main, "fmap", None) is not None else ref.fmap
    attn = main.attention if getattr(main, "attention", None) is not None else ref.attention
    heatmap = _to_numpy(fmap[0]).mean(axis=0) if fmap is not None else None  # (h, w): the PSM map / C
    attention = global_self = None
    if attn:
        last = _to_numpy(attn[-1][0])  # (K+1, K+1), query rows, global token last
        k = last.shape[0] - 1
        attention, global_self = last[k, :k].astype(np.float64), float(last[k, k])
        if len(cfg.head_pools) > 1:  # each head has its own AFFM (model.head_pools)
            notes.append(f"The model has {len(cfg.head_pools)} heads, each with its own AFFM: the attention shown "
                         "is their mean, as the score is the mean of their logits.")
    from scanner.scan.results import label_for

    return Explanation(
        image_id=image_id, width=int(image.shape[2]), height=int(image.shape[1]), score=score,
        label=label_for(score, info.threshold), threshold=float(info.threshold), model_id=info.model_id,
        backend=backend, boxes=boxes, groups=box_groups(len(boxes), cfg), patch_sizes=tuple(cfg.patch_sizes),
        windows=tuple(cfg.windows), heatmap=heatmap, attention=attention, global_self=global_self, notes=notes,
    )


# --------------------------------------------------------------------------------------- drawing


@dataclass(frozen=True)
class Layout:
    """Where the image lies in the PNG (pixels, origin top-left) and how image pixels map there."""

    width: int
    height: int
    left: int
    top: int
    image_w: int
    image_h: int
    src_w: int
    src_h: int

    def to_canvas(self, x: float, y: float) -> tuple[float, float]:
        """Image pixel coordinates -> PNG pixel coordinates."""
        return self.left + x * self.image_w / self.src_w, self.top + y * self.image_h / self.src_h


def layout_for(width: int, height: int) -> Layout:
    """The deterministic geometry of the PNG for an image of width x height (module docstring)."""
    image_w = WIDTH_PX - 2 * MARGIN_PX
    image_h = max(1, round(image_w * height / width))
    if image_h > MAX_IMAGE_PX:
        image_h = MAX_IMAGE_PX
        image_w = max(1, round(MAX_IMAGE_PX * width / height))
    left = (WIDTH_PX - image_w) // 2
    return Layout(WIDTH_PX, TOP_PX + image_h + BOTTOM_PX, left, TOP_PX, image_w, image_h, width, height)


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % rgb


def shorten(text: str, limit: int = 110) -> str:
    """Cut the middle out of long text; control characters and lone surrogates shown escaped."""
    text = "".join(ch if ch.isprintable() and not 0xD800 <= ord(ch) <= 0xDFFF else ascii(ch)[1:-1] for ch in text)
    return text if len(text) <= limit else text[: limit // 2 - 1] + "…" + text[-(limit // 2 - 1) :]


def group_legend(expl: Explanation) -> str:
    parts = []
    for g in sorted(set(expl.groups.tolist())):
        colour = GROUP_COLOUR_NAMES[g % len(GROUP_COLOUR_NAMES)]
        if g < len(expl.windows):
            w = expl.windows[g]
            parts.append(f"{colour} = picks of the {w}x{w} windows ({expl.patch_sizes[g]} px boxes)")
        else:
            parts.append(f"{colour} = group {g}")
    return "Boxes: " + ", ".join(parts) + "; label 'n: a' = patch n (pick order) and its attention weight a."


def box_label(expl: Explanation, i: int) -> str:
    """The text beside box i: its number (pick order, from 1) and its attention weight."""
    return f"{i + 1}" + (f": {expl.attention[i]:.3f}" if expl.attention is not None else "")


def render(expl: Explanation, image: torch.Tensor, out_path) -> Layout:
    """Draw the explanation of uint8 (3, H, W) `image` to a PNG at `out_path`; returns its layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg directly: headless, no pyplot state
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from PIL import Image

    lay = layout_for(expl.width, expl.height)
    fig = Figure(figsize=(lay.width / DPI, lay.height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((lay.left / lay.width, 1 - (lay.top + lay.image_h) / lay.height,
                       lay.image_w / lay.width, lay.image_h / lay.height))
    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    shrinking = lay.image_w < expl.width
    # Downscaled for drawing only; drawn 1:1 onto the axes' pixels (nearest), boxes in image coordinates.
    drawn = pil.resize((lay.image_w, lay.image_h), Image.Resampling.LANCZOS if shrinking else Image.Resampling.NEAREST)
    ax.imshow(np.asarray(drawn), extent=(0, expl.width, expl.height, 0), interpolation="nearest", aspect="auto")
    side = min(expl.width, expl.height)
    ox, oy = (expl.width - side) // 2, (expl.height - side) // 2
    if expl.heatmap is not None:
        heat = expl.heatmap - expl.heatmap.min()
        heat = heat / heat.max() if heat.max() > 0 else heat
        ax.imshow(heat, extent=(ox, ox + side, oy + side, oy), cmap=HEAT_CMAP, alpha=HEAT_ALPHA, vmin=0, vmax=1,
                  interpolation="bilinear", aspect="auto")
        ax.add_patch(Rectangle((ox, oy), side, side, fill=False, edgecolor="white", linestyle="--", linewidth=0.8,
                               alpha=0.8))
    sx, sy = expl.width / lay.image_w, expl.height / lay.image_h  # image pixels per PNG pixel
    line_pt = LINE_PX * 72 / DPI
    order = np.argsort(expl.groups, kind="stable")[::-1]  # later groups (smaller boxes) drawn first, 224s on top
    for i in order:
        x0, y0, x1, y1 = (int(v) for v in expl.boxes[i])
        colour = _hex(GROUP_COLOURS[int(expl.groups[i]) % len(GROUP_COLOURS)])
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=line_pt,
                               antialiased=False))
    for i in order:
        x0, y0, x1, y1 = (int(v) for v in expl.boxes[i])
        colour = _hex(GROUP_COLOURS[int(expl.groups[i]) % len(GROUP_COLOURS)])
        text = box_label(expl, i)
        big = int(expl.groups[i]) == 0
        # 224 px labels at the top-left corner, smaller boxes' at the bottom-left: fewer collisions.
        ax.text(x0 + 4 * sx, (y0 + 4 * sy) if big else (y1 - 4 * sy), text, color="black", fontsize=9,
                va="top" if big else "bottom", ha="left", parse_math=False, clip_on=True,
                bbox={"facecolor": colour, "edgecolor": "none", "pad": 1.5})
    ax.set_xlim(0, expl.width)
    ax.set_ylim(expl.height, 0)
    ax.set_axis_off()

    title_colour = "#c0392b" if expl.label == "synthetic" else "#1e8449"
    y = 1 - 10 / lay.height
    fig.text(MARGIN_PX / lay.width, y, f"{expl.label.upper()}   score {expl.score:.4f}   (threshold {expl.threshold:.4g})",
             fontsize=15, weight="bold", color=title_colour, va="top", parse_math=False)
    fig.text(MARGIN_PX / lay.width, y - 30 / lay.height,
             shorten(f"model {expl.model_id} · backend {expl.backend} · {expl.image_id} ({expl.width}x{expl.height})", 150),
             fontsize=10, va="top", parse_math=False)
    lines = []
    if expl.heatmap is not None:
        h, w = expl.heatmap.shape
        lines.append(f"Heatmap: channel mean of the global feature map ({h}x{w}; the PSM's activation map / C), min-max "
                     "normalised, upsampled over the central square the global view saw (dashed).")
    else:
        lines.append("Heatmap: none (no feature map available).")
    lines.append(group_legend(expl))
    if expl.attention is not None:
        lines.append(f"Attention: last AFFM layer, head-averaged, global token as query; the {len(expl.attention)} "
                     f"weights shown sum to {expl.attention.sum():.3f} (the global token keeps {expl.global_self:.3f}).")
    else:
        lines.append("Attention: none (no attention weights available).")
    lines += expl.notes
    if lay.image_w != expl.width:
        lines.append(f"Image drawn at {lay.image_w}x{lay.image_h} from {expl.width}x{expl.height} (scaled for drawing only).")
    wrapped = [(n, part) for n, line in enumerate(lines) for part in textwrap.wrap(shorten(line, 400), 180)]
    base = (BOTTOM_PX - 10) / lay.height
    for row, (n, part) in enumerate(wrapped[:BOTTOM_LINES]):
        fig.text(MARGIN_PX / lay.width, base - row * 19 / lay.height, part, fontsize=8.5, va="top",
                 parse_math=False, color="#222222" if n < 3 else "#555555")
    fig.savefig(out_path, format="png", dpi=DPI)
    return lay


# ---------------------------------------------------------------------------------------- command


def default_out(image_id: str) -> Path:
    """`IMAGE_STEM.explain.png` in the current directory (the member's stem for archive ids)."""
    split = split_member_id(image_id)
    name = split[1] if split else image_id
    stem = Path(name.rstrip("/")).stem or "image"
    return Path(f"{stem}.explain.png")


def explain_file(image_id: str, *, model_path=None, backend: str = "torch", out=None, threads: int | None = None,
                 engines_dir=None) -> tuple[Explanation, Path]:
    """Read, decode, score and draw one image (a path or an `archive::member` id). Returns (explanation, PNG path)."""
    from scanner.decoding.decode import DecodeError, decode
    from scanner.model.weights import load_detector

    if not (os.path.exists(image_id) or split_member_id(image_id)):
        raise ScannerError(f"{image_id!r} does not exist; pass an image file or an archive member id (a.tar::member)")
    try:
        data = read_id_bytes(image_id)
    except ItemError as exc:
        raise ScannerError(f"cannot read {image_id!r} ({exc.kind}: {exc}); pass a readable image file") from None
    try:
        # Over-budget images are explained at reduced size, as `scanner run --downscale-large` scans them.
        decoded = decode(data, downscale_large=True)
    except DecodeError as exc:
        raise ScannerError(f"cannot decode {image_id!r} ({exc.kind}: {exc}); pass an image file") from None
    model, info = load_detector(model_path)
    runner = None if backend == "torch" else _load_backend(backend, model_path, threads, engines_dir)
    notes = []
    if decoded.downscaled:
        notes.append(f"The image ({decoded.width}x{decoded.height}) is over the pixel budget: scored at "
                     f"{decoded.image.shape[2]}x{decoded.image.shape[1]}, as `scanner run --downscale-large` does.")
    expl = explain_image(decoded.image, model, info, image_id=image_id, runner=runner, backend=backend, notes=notes)
    out_path = Path(out) if out is not None else default_out(image_id)
    if out_path.parent and not out_path.parent.exists():
        out_path.parent.mkdir(parents=True, exist_ok=True)
    render(expl, decoded.image, out_path)
    return expl, out_path
