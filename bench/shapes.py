"""The shapes bench/bench.py times.

ResNet-50's BatchNorm shapes are derived from the architecture (torchvision's resnet50, v1.5:
the stride of a downsampling bottleneck sits on its 3x3 conv, so that block's conv1/bn1 still
runs at the input resolution), deduplicated, and each carries how many of the net's 53
BatchNorm layers have it.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional

# torchvision resnet50: (blocks, width) per stage; bottleneck expansion 4; stem output 64@112.
RESNET50_STAGES = ((3, 64), (4, 128), (6, 256), (3, 512))
RESNET50_EXPANSION = 4
RESNET50_BATCHES = (32, 256)


@dataclass(frozen=True)
class Shape:
    dims: tuple            # (N, C) for BatchNorm1d, (N, C, H, W) for BatchNorm2d
    group: str             # "resnet50-b32", "resnet50-b256", "other"
    note: str = ""         # e.g. "x6 in ResNet-50", "C=3"
    count: Optional[int] = None  # occurrences in ResNet-50, None elsewhere

    @property
    def label(self) -> str:
        return "x".join(str(d) for d in self.dims)

    @property
    def is_2d(self) -> bool:
        return len(self.dims) == 2

    @property
    def numel(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n


def resnet50_bn_channels_hw() -> Counter:
    """Counter of (channels, spatial side) over every BatchNorm layer of ResNet-50."""
    found = Counter()
    hw = 112
    found[(64, hw)] += 1                      # stem: conv1 7x7/2 -> bn1
    hw //= 2                                  # maxpool 3x3/2 -> 56
    in_ch = 64
    for stage, (blocks, width) in enumerate(RESNET50_STAGES):
        out_ch = width * RESNET50_EXPANSION
        for block in range(blocks):
            stride = 2 if (stage > 0 and block == 0) else 1
            found[(width, hw)] += 1           # conv1 1x1, at the block's input resolution
            hw_out = hw // stride
            found[(width, hw_out)] += 1       # conv2 3x3, carries the stride (v1.5)
            found[(out_ch, hw_out)] += 1      # conv3 1x1
            if block == 0 and (stride != 1 or in_ch != out_ch):
                found[(out_ch, hw_out)] += 1  # downsample 1x1 conv + bn
            in_ch, hw = out_ch, hw_out
    assert sum(found.values()) == 53, found
    return found


def resnet50_shapes(batch: int) -> list:
    out = []
    for (c, hw), n in resnet50_bn_channels_hw().items():  # insertion order = order in the net
        out.append(Shape((batch, c, hw, hw), f"resnet50-b{batch}", f"x{n} in ResNet-50", n))
    return out


def other_shapes() -> list:
    return [
        Shape((4096, 1024), "other", "BatchNorm1d"),
        Shape((8, 32, 256, 256), "other", "few channels, large HxW"),
        Shape((32, 3, 224, 224), "other", "odd: C=3"),
        Shape((256, 1000), "other", "odd: C=1000, BatchNorm1d"),
        Shape((32, 1000, 7, 7), "other", "odd: C=1000, 7x7"),
        Shape((1, 64, 512, 512), "other", "odd: N=1, large HxW"),
    ]


def full_plan(layouts: list) -> list:
    """[(Shape, layout)] for the full run; BatchNorm1d shapes get layout 'n/a'."""
    shapes = []
    for b in RESNET50_BATCHES:
        shapes += resnet50_shapes(b)
    shapes += other_shapes()
    return _with_layouts(shapes, layouts)


def quick_plan(layouts: list) -> list:
    """The engineering notes' table (section 4), 32x256x56x56 channels-last and BatchNorm1d
    (4096, 1024)."""
    r50 = {s.dims: s for s in resnet50_shapes(32)}
    pairs = [
        (r50[(32, 64, 56, 56)], "nchw"),
        (r50[(32, 256, 56, 56)], "nchw"),
        (r50[(32, 2048, 7, 7)], "nchw"),
        (r50[(32, 64, 56, 56)], "nhwc"),
        (r50[(32, 256, 56, 56)], "nhwc"),   # channels-last beyond a GPU's L2 too
        (Shape((4096, 1024), "other", "BatchNorm1d"), "n/a"),
    ]
    return [(s, lay) for s, lay in pairs if lay == "n/a" or lay in layouts]


def _with_layouts(shapes: list, layouts: list) -> list:
    plan = []
    for s in shapes:
        if s.is_2d:
            plan.append((s, "n/a"))
        else:
            plan += [(s, lay) for lay in layouts]
    return plan


if __name__ == "__main__":
    for (c, hw), n in resnet50_bn_channels_hw().items():
        print(f"C={c:5d} {hw:3d}x{hw:<3d}  x{n}")
