"""Image decoding and the augmentations applied to decoded image tensors.

``decode_image`` turns encoded bytes (JPEG, PNG, BMP, anything Pillow reads) into the
tensor insightface trains on: RGB, (3, H, W) float32, ``(x / 255 - 0.5) / 0.5`` in [-1, 1].
Transforms then act on such tensors.

Randomness: ``RandomHorizontalFlip`` draws from torch's global RNG of the process that runs
it. In DataLoader worker processes torch seeds that RNG with ``base_seed + worker_id``, and
``base_seed`` comes from the main process's global RNG when the epoch's iterator is made, so
after ``torch.manual_seed(s)`` a run with the same data order and ``num_workers`` flips the
same samples, and every epoch flips afresh.

Example::

    from hybridfc.data import Compose, RandomHorizontalFlip, RecordIODataset

    dataset = RecordIODataset("faces_emore/train", transform=Compose([RandomHorizontalFlip()]))
    image, label = dataset[0]      # image: (3, 112, 112) float32 in [-1, 1]
"""

import io
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

Transform = Callable[[Tensor], Tensor]


def decode_image(data: bytes, source: str) -> Tensor:
    """Encoded image bytes -> (3, H, W) float32 in [-1, 1]; errors name ``source``."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot decode the image of {source}: {error}") from error
    chw = np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)
    chw /= 127.5
    chw -= 1.0
    return torch.from_numpy(chw)


class RandomHorizontalFlip:
    """Mirrors a (3, H, W) tensor left-right with probability ``p`` (global torch RNG)."""

    def __init__(self, p: float = 0.5) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be a float in [0, 1], got {p!r}")
        self.p = float(p)

    def __call__(self, image: Tensor) -> Tensor:
        if torch.rand(()) < self.p:
            return image.flip(-1)
        return image

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Compose:
    """Applies ``transforms`` in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Tensor) -> Tensor:
        for transform in self.transforms:
            image = transform(image)
        return image

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


def resize_image(image: Tensor, image_size: tuple[int, int]) -> Tensor:
    """``(3, h, w)`` -> ``(3, H, W)``, ``image_size = (H, W)``: bilinear, antialiased; as is if it fits."""
    if tuple(image.shape[1:]) == tuple(image_size):
        return image
    return F.interpolate(image[None], size=image_size, mode="bilinear", antialias=True, align_corners=False)[0]


class Resize:
    """``(3, h, w)`` -> ``(3, size, size)``, bilinear and antialiased; as is when it fits."""

    def __init__(self, size: int) -> None:
        self.size = (size, size)

    def __call__(self, image: Tensor) -> Tensor:
        return resize_image(image, self.size)

    def __repr__(self) -> str:
        return f"Resize({self.size[0]})"


class RandomShift:
    """Pads a ``(3, H, W)`` image with ``pad`` black pixels (-1) on each side and crops a random
    ``H x W`` window of it (torch's global RNG, as ``RandomHorizontalFlip``)."""

    def __init__(self, pad: int) -> None:
        self.pad = pad

    def __call__(self, image: Tensor) -> Tensor:
        _, height, width = image.shape
        padded = F.pad(image, (self.pad,) * 4, value=-1.0)
        top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
        return padded[:, top:top + height, left:left + width]

    def __repr__(self) -> str:
        return f"RandomShift(pad={self.pad})"
