"""Data for hybridfc: a generated many-class task and the distributed training loader.

Example::

    from hybridfc.data import DistributedLoader, SyntheticClasses

    dataset = SyntheticClasses(num_classes=10_000, samples_per_class=20)
    loader = DistributedLoader(dataset, batch_size=256)
"""

from hybridfc.data.image_folder import ImageFolderDataset, open_image_set
from hybridfc.data.loader import DistributedLoader
from hybridfc.data.recordio import RecordIODataset, RecordIOError, write_recordio
from hybridfc.data.synthetic import SyntheticClasses, nearest_mean_accuracy
from hybridfc.data.transforms import Compose, RandomHorizontalFlip, RandomShift, Resize, decode_image, resize_image

__all__ = ["DistributedLoader", "SyntheticClasses", "nearest_mean_accuracy"]
__all__ += [
    "Compose",
    "ImageFolderDataset",
    "RandomHorizontalFlip",
    "RandomShift",
    "RecordIODataset",
    "RecordIOError",
    "Resize",
    "decode_image",
    "open_image_set",
    "resize_image",
    "write_recordio",
]
