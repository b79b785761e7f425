"""Inside a trained model: its first convolution's kernels, and the feature maps of any layer.

Kernels: the first conv layer's filters (a ViT's patch embedding), trained beside initial. The
initial ones are *saved* at the start of every run (``initial.pth`` in the run folder, a few KB;
see core.trainer) rather than re-created from the seed: with pretrained or user weights, a
resumed run or a changed library the seed would not give them back. Runs from before this file
existed have none (``initial`` is None).

Feature maps: forward hooks record a layer's output for one image; ``feature_layers`` lists the
layers that can be chosen (every named module whose output is an N×C×h×w map, in the order the
forward pass reaches them; a module called twice, like the tutorial net's shared ``pool``, shows
its last call). Channels are ranked by their mean absolute activation, most active first.

API::

    kernel_grid(weight, scale=None, upscale=6, pad=1) -> H×W×3 (or H×W×1) uint8 array
    conv_kernels(run_or_checkpoint, upscale=6 | None for auto_upscale) -> dict(layer, trained, initial,
        trained_grid, initial_grid, change)
    feature_layers(model, input_shape) -> DataFrame[layer, type, channels, height, width]
    feature_maps(model, image_tensor, layer, max_channels=16) -> dict(layer, maps, channels, activity, total, grid)
    run_feature_maps(run_or_checkpoint, image, layer, max_channels=16) -> the same, plus "image"
    run_feature_layers(run_or_checkpoint) -> feature_layers at the run's input size
    (both take a Predictor too, and hold its hooks_lock while hooks are on its model)
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from core import explain, models, rundir
from core.checkpoints import load_checkpoint
from core.errors import DataError, ModelError

log = logging.getLogger(__name__)


def _tile(tiles: np.ndarray, pad: int, fill: int = 255) -> np.ndarray:
    """N×h×w×C tiles → one image, ⌈√N⌉ tiles a row, ``pad`` pixels of ``fill`` between them."""
    n, h, w, c = tiles.shape
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), fill, dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = tiles[k]
    return out


def kernel_grid(weight, scale: float | None = None, upscale: int = 6, pad: int = 1) -> np.ndarray:
    """Filters O×C×kh×kw as a grid image (uint8 H×W×3 for 3 input channels, else H×W×1 showing
    the channels' mean). Values map linearly from [−scale, scale] to [0, 255] (grey = 0), one
    scale for every filter so that they compare; ``scale`` defaults to the largest |weight|.
    Each kernel pixel becomes ``upscale``×``upscale`` pixels."""
    w = weight.detach().float().cpu().numpy() if isinstance(weight, torch.Tensor) else np.asarray(weight, np.float32)
    if w.ndim != 4:
        raise DataError(f"Kernels are a 4-D array (filters × channels × height × width), got shape {w.shape}.")
    if w.shape[1] != 3:
        w = w.mean(axis=1, keepdims=True)
    scale = float(scale if scale is not None else np.abs(w).max()) or 1.0
    tiles = np.clip(np.round((w / scale + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    tiles = tiles.repeat(upscale, axis=1).repeat(upscale, axis=2)
    return _tile(tiles, pad)


def _to_image(grid: np.ndarray) -> Image.Image:
    return Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)


def _checkpoint_path(run_or_checkpoint: str | Path) -> tuple[Path, Path | None]:
    """(checkpoint, run folder or None) for a run folder (best, else last) or a checkpoint file."""
    path = Path(run_or_checkpoint)
    if path.is_dir():
        from core.inference import find_checkpoint
        return find_checkpoint(path), path
    return path, (path.parent if rundir.is_run_dir(path.parent) else None)


KERNEL_GRID_WIDTH = 1000   # px: conv_kernels(upscale=None) enlarges the kernels up to about this width


def auto_upscale(filters: int, kernel_width: int, width: int = KERNEL_GRID_WIDTH, most: int = 6) -> int:
    """How much to enlarge each kernel pixel so that a grid of ``filters`` kernels (⌈√filters⌉ a
    row) stays about ``width`` pixels wide: 6 for a small net's 5×5 filters, 2 for a ViT's 768
    patch filters of 16×16, never under 1."""
    cols = max(1, math.ceil(math.sqrt(filters)))
    return max(1, min(most, width // (cols * (kernel_width + 1))))


def conv_kernels(run_or_checkpoint: str | Path, upscale: int | None = 6) -> dict[str, Any]:
    """The first conv layer's kernels of a run (best.pth, else last.pth) beside their initial values.

    Returns {"layer": its name, "trained": O×C×kh×kw float32 array (the checkpoint's), "initial":
    the same before training (from initial.pth) or None, "trained_grid" / "initial_grid": PIL
    images on one shared scale, "change": per-filter L2 distance trained − initial (None without
    initial)}. ``upscale`` None: ``auto_upscale`` (the grid about KERNEL_GRID_WIDTH pixels wide)."""
    ckpt_path, run_dir = _checkpoint_path(run_or_checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    name = models.first_conv_name(ckpt["config"]["model"]["name"])
    weight = ckpt["model"].get(f"{name}.weight")
    if weight is None or weight.ndim != 4:
        raise ModelError(f"{ckpt['config']['model']['name']} has no convolution as its first layer "
                         f"({name!r} holds no 4-D kernels), so there are no filters to show.")
    trained = weight.float().numpy()
    initial = None
    init_path = run_dir / rundir.INITIAL_WEIGHTS if run_dir is not None else None
    if init_path is not None and init_path.is_file():
        saved = load_checkpoint(init_path)
        if saved.get("layer") == name and tuple(saved["weight"].shape) == trained.shape:
            initial = saved["weight"].float().numpy()
        else:
            log.warning("%s of run %s does not match its checkpoint; ignored", rundir.INITIAL_WEIGHTS, run_dir.name)
    upscale = upscale or auto_upscale(trained.shape[0], trained.shape[3])
    scale = float(max(np.abs(trained).max(), np.abs(initial).max() if initial is not None else 0.0)) or 1.0
    return {"layer": name, "trained": trained, "initial": initial,
            "trained_grid": _to_image(kernel_grid(trained, scale, upscale)),
            "initial_grid": _to_image(kernel_grid(initial, scale, upscale)) if initial is not None else None,
            "change": (np.sqrt(((trained - initial) ** 2).reshape(len(trained), -1).sum(1))
                       if initial is not None else None)}


def _record_outputs(model: nn.Module, x: torch.Tensor, names: list[str] | None) -> dict[str, torch.Tensor]:
    """Outputs of the named modules (all of them when None) for input ``x``, in call order."""
    seen: dict[str, torch.Tensor] = {}
    wanted = [(n, m) for n, m in model.named_modules() if n and (names is None or n in names)]

    def hook_for(name):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor):
                seen.pop(name, None)   # a second call moves the module to its last place
                seen[name] = output.detach()
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in wanted]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return seen


def feature_layers(model: nn.Module, input_shape) -> pd.DataFrame:
    """The layers whose feature maps can be shown: every named module whose output is an
    N×C×h×w map, in forward order, with its channels and map size (one forward pass of a zero
    image of ``input_shape`` (C, H, W))."""
    c, h, w = (int(v) for v in input_shape)
    device = next(model.parameters()).device
    outputs = _record_outputs(model, torch.zeros(1, c, h, w, device=device), None)
    rows = [{"layer": n, "type": type(model.get_submodule(n)).__name__, "channels": o.shape[1],
             "height": o.shape[2], "width": o.shape[3]} for n, o in outputs.items() if o.ndim == 4]
    return pd.DataFrame(rows, columns=["layer", "type", "channels", "height", "width"])


def _map_tiles(maps: np.ndarray, upscale: int) -> np.ndarray:
    """K×h×w activations → K×h'×w'×1 uint8 tiles, each scaled to its own min..max."""
    lo = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - lo
    norm = np.divide(maps - lo, span, out=np.zeros_like(maps), where=span > 0)
    tiles = np.round(norm * 255).astype(np.uint8)[..., None]
    return tiles.repeat(upscale, axis=1).repeat(upscale, axis=2)


def feature_maps(model: nn.Module, image_tensor: torch.Tensor, layer: str, max_channels: int = 16,
                 upscale: int | None = None) -> dict[str, Any]:
    """The activations of ``layer`` for one normalised C×H×W image, most active channels first.

    Returns {"layer", "maps": K×h×w float32 array (K ≤ max_channels), "channels": their channel
    numbers, "activity": their mean |activation|, "total": the layer's channel count, "grid": PIL image of the maps, each scaled to its
    own range (white = its highest value)}. An unknown or non-map layer raises ModelError listing
    the choices."""
    x = torch.as_tensor(image_tensor).float()
    x = x.unsqueeze(0) if x.ndim == 3 else x
    x = x.to(next(model.parameters()).device)
    out = _record_outputs(model, x, [layer]).get(layer)
    if out is None or out.ndim != 4:
        choices = feature_layers(model, x.shape[1:])["layer"].tolist()
        raise ModelError(f"Layer {layer!r} has no feature map to show for this model; choose one of: "
                         f"{', '.join(choices)}.")
    acts = out[0].float().cpu().numpy()
    activity = np.abs(acts).mean(axis=(1, 2))
    order = np.argsort(-activity, kind="stable")[:max(1, max_channels)]
    maps = acts[order]
    upscale = upscale or max(1, 64 // max(maps.shape[1:]))
    return {"layer": layer, "maps": maps, "channels": order.tolist(), "activity": activity[order],
            "total": int(acts.shape[0]), "grid": _to_image(_tile(_map_tiles(maps, upscale), pad=2))}


def run_feature_maps(run_or_checkpoint, image, layer: str, max_channels: int = 16) -> dict[str, Any]:
    """``feature_maps`` with a run's model (best.pth, else last.pth, or a loaded Predictor such as
    the UI's shared one) on an image (PIL, path, bytes or uint8 array), plus "image": the image as
    the model sees it; ``layer`` from ``run_feature_layers``. The hooks go on while
    ``predictor.hooks_lock`` is held: a shared model's other users never see them."""
    predictor = explain.load_predictor(run_or_checkpoint)
    view, tensor = predictor.model_input(image)
    with predictor.hooks_lock:
        result = feature_maps(predictor.model, tensor, layer, max_channels)
    result["image"] = view
    return result


def run_feature_layers(run_or_checkpoint) -> pd.DataFrame:
    """``feature_layers`` of a run's model (or a loaded Predictor) at its input size, its hooks on
    only while ``predictor.hooks_lock`` is held."""
    predictor = explain.load_predictor(run_or_checkpoint)
    with predictor.hooks_lock:
        return feature_layers(predictor.model, predictor.input_shape)
