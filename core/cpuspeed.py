"""How each zoo family trains fastest on a CPU: measured, not assumed (issue 16).

``benchmarks/bench_speed.py --zoo`` (2 threads, 32×32 input, small-input stem, SGD, median of 3) on
this project's machine kind, a CPU with native bf16 (AVX-512 BF16 / AMX), 2026-12-05. Training
images/s, fp32 / fp32 channels_last / bf16 / bf16 channels_last:

    tutorial_net       14,612 / 15,890 / 16,211 / 17,729     cifar_fast          297 /   371 /   664 / 1,027
    lenet5             15,024 / 16,118 / 15,028 / 17,768     cifar_fast_small  1,122 / 1,598 / 1,851 / 3,284
    resnet18               65 /     70 /    136 /    161     vgg11_bn             29 /    30 /    32 /    32
    mobilenet_v3_small    228 /    319 /    187 /    171     efficientnet_b0      56 /    68 /    53 /    48
    shufflenet_v2_x1_0    209 /    205 /    186 /    171     squeezenet1_1       576 /   777 /   627 / 1,136
    densenet121            20 /     24 /     31 /     40     convnext_tiny        16 /    18 /    21 /    20
    alexnet                57 /    146 /     84 /     37

So bf16 is not a blanket win: the depthwise families (MobileNet, EfficientNet, ShuffleNet) and
AlexNet train slower in it, the dense convolutions 1.1–2.8× faster; channels_last pays for some
models in one precision and costs in the other. The rules below take a choice when it measured at
least 10 % faster; families not measured follow their measured member (ResNet-34/50 as ResNet-18,
VGG as VGG-11-BN, MobileNet-V2/V3-large as V3-small).
"""
from __future__ import annotations

# model → (bf16 trains ≥ 10 % faster than fp32 with the better layout of each,
#          channels_last ≥ 10 % faster in fp32, channels_last ≥ 10 % faster in bf16)
_MEASURED = {
    "tutorial_net": (True, False, False), "lenet5": (True, False, True),
    "cifar_fast": (True, True, True), "cifar_fast_small": (True, True, True),
    "resnet18": (True, False, True), "vgg11_bn": (False, False, False),
    "mobilenet_v3_small": (False, True, False), "efficientnet_b0": (False, True, False),
    "shufflenet_v2_x1_0": (False, False, False), "squeezenet1_1": (True, True, True),
    "densenet121": (True, True, True), "convnext_tiny": (True, False, False),
    "alexnet": (False, True, False),
}
_LIKE = {"resnet34": "resnet18", "resnet50": "resnet18", "vgg11": "vgg11_bn", "vgg16": "vgg11_bn",
         "vgg16_bn": "vgg11_bn", "mobilenet_v2": "mobilenet_v3_small", "mobilenet_v3_large": "mobilenet_v3_small"}
_UNMEASURED = (True, False, False)   # e.g. vit_b_16: matrix products throughout, which bf16 speeds up


def _row(model: str) -> tuple[bool, bool, bool]:
    return _MEASURED.get(_LIKE.get(model, model), _UNMEASURED)


# Measured through the engine at 32×32 WITHOUT the small-input stem (the ImageNet stem shrinks the maps
# to 8×8 and below, where casts outweigh the faster products): ResNet-18 batch 128, fp32 700–731
# images/s, bf16 594–672 (2026-12-05). The table above is for the small-input stem.
_TINY_MAPS_FP32 = frozenset({"resnet18", "resnet34", "resnet50"})


def bf16_pays(model: str, tiny_maps: bool = False) -> bool:
    """Whether ``model`` trains faster in bf16 than in fp32 on a CPU with native bf16; ``tiny_maps``:
    small images through the ImageNet stem (no small-input stem)."""
    if tiny_maps and model in _TINY_MAPS_FP32:
        return False
    return _row(model)[0]


def channels_last_pays(model: str, precision: str) -> bool:
    """Whether ``model`` trains faster in channels_last on the CPU in ``precision``."""
    _, fp32, half = _row(model)
    return half if precision in ("bf16", "fp16") else fp32
