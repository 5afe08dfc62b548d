"""Data for hybridfc: a generated many-class task and the distributed training loader.

Example::

    from hybridfc.data import DistributedLoader, SyntheticClasses

    dataset = SyntheticClasses(num_classes=10_000, samples_per_class=20)
    loader = DistributedLoader(dataset, batch_size=256)
"""

from hybridfc.data.loader import DistributedLoader
from hybridfc.data.synthetic import SyntheticClasses

__all__ = ["DistributedLoader", "SyntheticClasses"]
