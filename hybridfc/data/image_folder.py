"""A folder of images with one sub-folder per class.

Class folders, sorted by name, get ids 0..C-1; each holds that class's images, found
recursively and sorted by path, kept when their extension (any case) is in
``extensions``. Items are decoded as in ``decode_image``: (3, H, W) float32 in [-1, 1].

Example::

    from hybridfc.data import DistributedLoader, ImageFolderDataset

    dataset = ImageFolderDataset("faces/train")     # faces/train/<identity>/<image>.jpg
    loader = DistributedLoader(dataset, batch_size=128, num_workers=4)
    for x, y in loader:        # x: (b, 3, H, W) float32 in [-1, 1], y: (b,) int64
        ...
"""

import operator
import os
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from hybridfc.data.recordio import RecordIODataset
from hybridfc.data.transforms import Transform, decode_image


def _images_under(folder: str, extensions: tuple[str, ...]) -> list[str]:
    """Paths of the files under ``folder`` (recursively) with one of ``extensions``, sorted."""
    found = []
    for directory, _, files in os.walk(folder, followlinks=True):
        found += [os.path.join(directory, f) for f in files if f.lower().endswith(extensions)]
    return sorted(found)


class ImageFolderDataset(Dataset):
    """Item i is (image (3, H, W) float32 in [-1, 1] after ``transform``, label () int64).

    Attributes: ``classes`` (folder names, sorted), ``class_to_idx``, ``num_classes``,
    ``samples`` (list of (path, class id)).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Transform | None = None,
        extensions: Sequence[str] = (".jpg", ".jpeg", ".png", ".bmp"),
    ) -> None:
        self.root = os.fspath(root)
        self.transform = transform
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        extensions = (extensions,) if isinstance(extensions, str) else tuple(extensions)
        suffixes = tuple(e.lower() for e in extensions)
        self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        if not self.classes:
            raise ValueError(f"image folder {self.root} holds no class folder")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for name, label in self.class_to_idx.items():
            images = _images_under(os.path.join(self.root, name), suffixes)
            if not images:
                raise ValueError(
                    f"class folder {os.path.join(self.root, name)} holds no image with an "
                    f"extension in {list(extensions)}"
                )
            self.samples += [(path, label) for path in images]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """(image (3, H, W) float32, label () int64) of sample ``index``."""
        path, label = self.samples[operator.index(index)]
        try:
            with open(path, "rb") as file:
                data = file.read()
        except OSError as error:
            raise OSError(f"cannot read the image {path}: {error}") from error
        image = decode_image(data, path)
        if self.transform is not None:
            image = self.transform(image)
        return image, torch.tensor(label, dtype=torch.int64)


def open_image_set(path: str, num_classes: "int | None" = None) -> "ImageFolderDataset | RecordIODataset":
    """The image set at ``path``: a RecordIO set (a ``.rec`` file, its prefix, or a folder holding
    ``train.rec``), else an image folder; without a transform yet. ``num_classes`` is passed to a
    RecordIO set (one without a header then need not hold every class)."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "train.rec")):
        return ImageFolderDataset(path)
    if os.path.isdir(path) or path.endswith(".rec") or os.path.isfile(path + ".rec"):
        return RecordIODataset(path, num_classes=num_classes)
    raise FileNotFoundError(f"{path} is neither an image folder nor a RecordIO set (a .rec file, its prefix, "
                            "or a folder holding train.rec and train.idx)")
