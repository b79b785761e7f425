"""Where the model looks: Grad-CAM heatmaps for every model of the zoo, and their overlay.

Grad-CAM (Selvaraju et al. 2017) weighs the target layer's channels by the mean gradient of the
class score and keeps the positive part. It is Captum's ``LayerGradCam`` (with
``relu_attributions=True``, the paper's ReLU) upsampled with ``LayerAttribution.interpolate``
(bilinear) to the input size, then divided by its maximum so it lies in [0, 1]. The layer per
family is ``core.models.cam_layer``: the last module whose output is still a spatial map (ResNet
``layer4``, VGG/AlexNet/DenseNet/MobileNet/EfficientNet/SqueezeNet/ConvNeXt ``features``,
ShuffleNet ``conv5``, FastCIFAR ``group3``, the tutorial net ``conv2``, LeNet ``act2``).

A ViT has no spatial map: its "tokens" layer is the last block's first LayerNorm
(``encoder.layers.encoder_layer_11.ln_1``), whose patch tokens are the last the class token
attends to (the outputs of the last block's patch tokens never reach the head, so their gradient
is zero). Their N×(1+h·w)×D output is reshaped to the patch grid N×D×h×w in a forward hook and
passed through an identity module that Captum explains as it would a conv layer (the
"reshape transform" of pytorch-grad-cam's ViT recipe).

API::

    grad_cam(model, image_tensor, target_class, model_name) -> H×W float32 array in [0, 1]
    overlay(image, heatmap, opacity=0.5) -> PIL.Image        # heatmap coloured over the image
    explain_image(run_dir_or_checkpoint, image, target_class=None, opacity=0.5) -> dict
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from torch import nn

from core import inference, models
from core.errors import DataError, ModelError

log = logging.getLogger(__name__)

# A perceptual dark-to-bright colour scale (stops of matplotlib's "inferno"), linearly interpolated.
_INFERNO = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
                     [245, 125, 21], [250, 193, 39], [252, 255, 164]], dtype=np.float64)


class _TokenGrid(nn.Module):
    """Identity over a ViT's patch tokens laid out as N×D×h×w: the module Grad-CAM explains."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@contextlib.contextmanager
def _vit_token_grid(model: nn.Module, layer_name: str) -> Iterator[nn.Module]:
    """While open, ``layer_name``'s patch tokens pass through a _TokenGrid as a grid."""
    grid_module = _TokenGrid()
    gh, gw = model.grid

    def hook(module, inputs, output):
        cls, patches = output[:, :1], output[:, 1:]
        n, t, d = patches.shape
        grid = grid_module(patches.transpose(1, 2).reshape(n, d, gh, gw))
        return torch.cat([cls, grid.reshape(n, d, t).transpose(1, 2)], dim=1)

    handle = model.get_submodule(layer_name).register_forward_hook(hook)
    try:
        yield grid_module
    finally:
        handle.remove()


def _batch(image_tensor: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(image_tensor)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[0] != 1:
        raise DataError(f"Grad-CAM explains one image: a C×H×W or 1×C×H×W tensor, got {tuple(x.shape)}.")
    return x.detach().float().clone()


def _check_class(model: nn.Module, model_name: str, target_class: int) -> None:
    k = models.head_parameters(model, model_name)[0].shape[0]   # the head's weight: classes × ...
    if not 0 <= int(target_class) < k:
        raise DataError(f"The class to explain must be an index from 0 to {k - 1}; got {target_class}.")


def grad_cam(model: nn.Module, image_tensor: torch.Tensor, target_class: int, model_name: str) -> np.ndarray:
    """Grad-CAM heatmap (H×W float32 in [0, 1]; 1 at the peak) of ``target_class`` for one image.

    ``image_tensor``: the normalised C×H×W (or 1×C×H×W) input the model takes; ``model_name``:
    its zoo name (which layer to explain). All zeros when no location raises the class score (the
    positive part is empty). The model's train/eval mode is put back afterwards.
    """
    from captum.attr import LayerAttribution, LayerGradCam

    layer_name, kind = models.cam_layer(model_name)
    try:
        layer = model.get_submodule(layer_name)
    except AttributeError:
        raise ModelError(f"This model has no layer {layer_name!r}: is it really a {model_name}?") from None
    _check_class(model, model_name, target_class)
    was_training = model.training
    device = next(model.parameters()).device
    x = _batch(image_tensor).to(device)
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            with (_vit_token_grid(model, layer_name) if kind == "tokens" else contextlib.nullcontext(layer)) as target:
                attr = LayerGradCam(model, target).attribute(x, target=int(target_class), relu_attributions=True)
            heat = LayerAttribution.interpolate(attr.detach(), tuple(x.shape[-2:]), interpolate_mode="bilinear")
    finally:
        model.train(was_training)
    heat = heat[0, 0].clamp_min(0).float().cpu().numpy()
    peak = float(heat.max())
    return (heat / peak if peak > 0 else np.zeros_like(heat)).astype(np.float32)


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """H×W values in [0, 1] → H×W×3 uint8 colours (dark: 0, bright yellow: 1)."""
    h = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float64)), 0, 1) * (len(_INFERNO) - 1)
    lo = np.floor(h).astype(int).clip(0, len(_INFERNO) - 2)
    frac = (h - lo)[..., None]
    return np.round(_INFERNO[lo] * (1 - frac) + _INFERNO[lo + 1] * frac).astype(np.uint8)


def overlay(image: Image.Image, heatmap: np.ndarray, opacity: float = 0.5) -> Image.Image:
    """The heatmap, coloured, over ``image`` (RGB result, the image's size). Each pixel mixes in
    the colour by ``opacity`` × its heat, so cold regions keep the image as it is."""
    if not 0.0 <= opacity <= 1.0:
        raise DataError(f"The overlay's opacity must lie between 0 and 1, got {opacity}.")
    base = image.convert("RGB")
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.ndim != 2:
        raise DataError(f"A heatmap is a 2-D array (H×W), got shape {heat.shape}.")
    if heat.shape != (base.height, base.width):
        heat = np.asarray(Image.fromarray(heat, mode="F").resize(base.size, Image.BILINEAR))
    heat = np.clip(heat, 0, 1)
    alpha = (opacity * heat)[..., None]
    mixed = np.asarray(base, dtype=np.float32) * (1 - alpha) + colorize(heat).astype(np.float32) * alpha
    return Image.fromarray(np.round(mixed).astype(np.uint8), mode="RGB")


def _class_index(classes: list[str], target_class: int | str | None, probs: np.ndarray) -> int:
    if target_class is None:
        return int(np.argmax(probs))
    if isinstance(target_class, str):
        if target_class not in classes:
            raise DataError(f"Class {target_class!r} is not one of this model's classes: {', '.join(classes)}.")
        return classes.index(target_class)
    if not 0 <= int(target_class) < len(classes):
        raise DataError(f"The class to explain must be an index from 0 to {len(classes) - 1}; got {target_class}.")
    return int(target_class)


def load_predictor(run_or_checkpoint: str | Path | inference.Predictor, device: str = "cpu") -> inference.Predictor:
    """A Predictor for a run folder (its best checkpoint, else its last) or a checkpoint file."""
    if isinstance(run_or_checkpoint, inference.Predictor):
        return run_or_checkpoint
    path = Path(run_or_checkpoint)
    return inference.Predictor.from_run(path, device) if path.is_dir() else inference.Predictor(path, device)


def explain_image(run_or_checkpoint, image, target_class: int | str | None = None,
                  opacity: float = 0.5, device: str = "cpu") -> dict[str, Any]:
    """Grad-CAM for one image with a run's model (best.pth, else last.pth) or a checkpoint.

    ``image``: a PIL image, path, bytes or uint8 array; ``target_class``: None for the top class,
    else a class index or name. Returns {"heatmap": H×W array in [0, 1], "overlay": PIL image,
    "image": the image as the model sees it (PIL), "class": name, "class_index", "probability"
    (of that class), "top": [(class, probability)] best first (up to 5), "layer": what was explained}.
    """
    predictor = load_predictor(run_or_checkpoint, device)
    view, tensor = predictor.model_input(image)
    # The model may be shared (ui.common.predictors): Captum's hooks record every forward pass
    # through the layer while they are on, so nothing else runs the model meanwhile.
    with predictor.hooks_lock:
        with torch.inference_mode():
            probs = torch.softmax(predictor.model(tensor.unsqueeze(0).to(predictor.device)).float(), 1)[0].cpu().numpy()
        k = _class_index(predictor.classes, target_class, probs)
        heat = grad_cam(predictor.model, tensor, k, predictor.model_name)
    order = np.argsort(-probs)[:5]
    return {"heatmap": heat, "overlay": overlay(view, heat, opacity), "image": view,
            "class": predictor.classes[k], "class_index": k, "probability": float(probs[k]),
            "top": [(predictor.classes[i], float(probs[i])) for i in order],
            "layer": models.cam_layer(predictor.model_name)[0], "method": cam_method(predictor.model_name)}


def cam_method(model_name: str) -> str:
    """How the heat-map of ``model_name`` is made, in words for a page."""
    layer, kind = models.cam_layer(model_name)
    if kind == "tokens":
        return f"Grad-CAM on the last transformer block's patch tokens ({layer})"
    return f"Grad-CAM at layer {layer}"
