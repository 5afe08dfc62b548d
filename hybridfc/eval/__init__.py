"""Evaluation over a class-sharded head."""

from hybridfc.eval.topk import distributed_topk, topk_accuracy

__all__ = ["distributed_topk", "topk_accuracy"]
