"""Evaluation over a class-sharded head."""

from hybridfc.eval.topk import accuracies, distributed_topk, topk_accuracy, topk_correct

__all__ = ["accuracies", "distributed_topk", "topk_accuracy", "topk_correct"]

from hybridfc.eval.features import ImageList, extract_features, extract_features_from_list, read_image
from hybridfc.eval.verification import (ALLOWED_GLOBALS, PairFileError, evaluate_pair_bin, load_pair_bin,
                                        verification_metrics)

__all__ += ["ALLOWED_GLOBALS", "ImageList", "PairFileError", "evaluate_pair_bin", "extract_features",
            "extract_features_from_list", "load_pair_bin", "read_image", "verification_metrics"]
