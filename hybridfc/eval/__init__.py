"""Evaluation over a class-sharded head."""

from hybridfc.eval.topk import accuracies, distributed_topk, topk_accuracy, topk_correct

__all__ = ["accuracies", "distributed_topk", "topk_accuracy", "topk_correct"]
