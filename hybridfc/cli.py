"""The ``hybridfc`` console command: ``plan`` prints the head's capacity plan, ``export`` writes a
checkpoint's class centres for serving.

    hybridfc plan --num-classes 10000000 --embedding-size 512 --world-size 64 \\
                  --local-batch 64 --budget 0.1
    hybridfc plan --embedding-size 512 --world-size 64 --local-batch 64 --budget 0.1 --memory-gib 80
    hybridfc plan ... --backbone-params 8800000 --grad-topk 0.01
    hybridfc plan ... --json
    hybridfc export checkpoints --out centres.npy --dtype fp16 --normalize

The plan's arithmetic, and what each figure counts, is in :mod:`hybridfc.plan`; the export is
:func:`hybridfc.checkpoint.export_centres`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from typing import Optional, Sequence

from hybridfc.config import LOGITS_CHOICES
from hybridfc.plan import (DTYPE_BYTES, OPTIMIZER_STATES, SELECTIONS, Budget, GradientExchange, Plan, PlanInputs,
                           backbone_gradient_exchange, make_plan, max_num_classes)

GIB = 2**30
UNITS = "units: B = byte, KiB = 2^10 B, MiB = 2^20 B, GiB = 2^30 B (every figure; --json gives bytes)"
_PREFIXES = ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"))
_LABEL_WIDTH, _COLUMN_WIDTH = 54, 17

MEMORY_ROWS = (
    ("weight", "weight ({storage})"),
    ("optimizer_state", "optimizer state ({optimizer}: {states} x weight)"),
    ("weight_gradient", "weight gradient (fp32, of the normalised rows)"),
    ("logits", "logits (B x rows buffer, or a recompute tile)"),
    ("row_copy", "fp32 copy of the rows fed to normalise"),
    ("normalized_rows", "normalised rows (fp32; sharded: a column tile)"),
    ("normalize_temporaries", "normalise-backward temporaries (4 x rows, fp32)"),
    ("feature_buffers", "feature buffers (gathered, normalised, gradient)"),
    ("softmax_peak", "A: peak in the softmax backward"),
    ("normalize_peak", "B: peak in the normalise backward"),
    ("total", "total memory per rank = max(A, B)"),
)
COMMUNICATION_ROWS = (
    ("feature_all_gather", "feature all-gather (B x d fp32)"),
    ("label_all_gather", "labels + batch sizes all-gather (int64)"),
    ("softmax", "softmax all-reduces (3 fp32 per sample of B)"),
    ("feature_gradient", "feature-gradient reduce-scatter (B x d fp32)"),
    ("selection_lookup", "knn neighbour lists all-reduce (B x k int64)"),
    ("weight_gradient_sync", "weight-gradient all-reduce (C x d {storage})"),
    ("total", "total communication per rank"),
)


def parse_budget(text: str) -> Budget:
    """``"100"`` -> 100 rows (int), ``"0.1"`` -> rate 0.1 (float)."""
    try:
        return int(text) if re.fullmatch(r"[+-]?\d+", text.strip()) else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _add_plan_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "plan", help="memory and communication per rank of the classification head",
        description="Memory and communication per rank and step of the classification head, for "
                    "data-parallel, model-parallel and the chosen selection side by side. What each "
                    "figure counts: the hybridfc.plan module docstring and docs/planner.md.")
    p.add_argument("--num-classes", type=int, help="C (required unless --memory-gib is given)")
    p.add_argument("--embedding-size", type=int, required=True, help="d, the feature width")
    p.add_argument("--world-size", type=int, required=True, help="N, the ranks sharing the classes")
    p.add_argument("--local-batch", type=int, required=True, help="b, samples per rank per step")
    p.add_argument("--selection", choices=SELECTIONS,
                   help="classes computed per step (default: partial with --budget, else full)")
    p.add_argument("--budget", type=parse_budget,
                   help="rows computed per rank: a rate of the shard in (0, 1] (0.1) or a row count >= 1 (1000)")
    p.add_argument("--storage-dtype", choices=tuple(DTYPE_BYTES), default="fp32",
                   help="the head's weight storage (logits are always fp32; default fp32)")
    p.add_argument("--feature-dtype", choices=tuple(DTYPE_BYTES), default="fp32",
                   help="the backbone's output dtype; the head all-gathers features in fp32 whatever it is "
                        "(default fp32)")
    p.add_argument("--optimizer", choices=tuple(OPTIMIZER_STATES), default="sgd",
                   help="sgd: momentum SGD, 1 state tensor; adam: 2 (default sgd)")
    p.add_argument("--logits", choices=LOGITS_CHOICES, default="auto",
                   help="what the sharded head keeps of its logits for the backward pass: store (one fp32 "
                        "buffer), recompute (a tile) or auto (store while the buffer fits --logits-budget-mb; "
                        "default auto)")
    p.add_argument("--logits-budget-mb", type=_positive_float, default=1024,
                   help="the largest logits buffer auto stores, MiB (default 1024)")
    p.add_argument("--k", type=int, default=32,
                   help="knn: neighbours per class, whose lists of the batch's labels travel each step (default 32)")
    p.add_argument("--backbone-params", type=int,
                   help="also plan the backbone's gradient exchange: its trainable parameters")
    p.add_argument("--grad-topk", type=_positive_float, default=0.01,
                   help="with --backbone-params: the share of gradient entries sent (default 0.01)")
    p.add_argument("--grad-topk-value-dtype", choices=tuple(DTYPE_BYTES), default="bf16",
                   help="with --backbone-params: the values' dtype on the wire (default bf16, as the config's)")
    p.add_argument("--memory-gib", type=_positive_float,
                   help="also answer: the largest C whose chosen method fits this many GiB per rank")
    p.add_argument("--json", action="store_true", help="machine-readable output, in bytes")
    p.set_defaults(run=run_plan, subparser=p)


def _add_export_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "export", help="a checkpoint's class centres as one (C, d) .npy matrix",
        description="Write the head's class rows of a checkpoint, all shards, as one (C, d) .npy "
                    "matrix in class order; hybridfc.checkpoint.load_centres loads it into a head of "
                    "any world size.")
    p.add_argument("checkpoint", help="a checkpoint directory (its 'latest' tag) or a tag directory")
    p.add_argument("--out", required=True, help="the .npy file to write")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="of the matrix (default fp32)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise every row")
    p.set_defaults(run=run_export, subparser=p)


def run_export(args: argparse.Namespace) -> str:
    from hybridfc.checkpoint import CheckpointError, export_centres

    try:
        path = export_centres(args.checkpoint, args.out, args.dtype, args.normalize)
    except CheckpointError as exc:
        raise ValueError(str(exc)) from None
    return f"wrote {path}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridfc", description="hybridfc tools")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_plan_parser(commands)
    _add_export_parser(commands)
    return parser


def _inputs(args: argparse.Namespace, num_classes: int) -> PlanInputs:
    selection = args.selection or ("partial" if args.budget is not None else "full")
    return PlanInputs(num_classes=num_classes, embedding_size=args.embedding_size,
                      world_size=args.world_size, local_batch=args.local_batch, selection=selection,
                      budget=args.budget, storage_dtype=args.storage_dtype,
                      feature_dtype=args.feature_dtype, optimizer=args.optimizer, k=args.k,
                      logits=args.logits, logits_budget_mb=args.logits_budget_mb)


def _resolve(args: argparse.Namespace) -> tuple[PlanInputs, Optional[int]]:
    """The inputs to plan, and the largest C that fits ``--memory-gib`` (None if not asked)."""
    if args.num_classes is None and args.memory_gib is None:
        raise ValueError("give --num-classes, or --memory-gib to find the largest C that fits")
    rows = args.budget if isinstance(args.budget, int) else 1
    probe = args.num_classes if args.num_classes is not None else args.world_size * rows
    inputs = _inputs(args, probe)
    if args.memory_gib is None:
        return inputs, None
    fits = max_num_classes(inputs, args.memory_gib * GIB, "selection")
    if fits is None:
        raise ValueError(f"not even {probe} classes fit {args.memory_gib} GiB per rank with these settings")
    return (inputs if args.num_classes is not None else _inputs(args, fits)), fits


def format_bytes(nbytes: float) -> str:
    """``20480000000`` -> ``"19.07 GiB"``: the largest binary prefix that keeps the value >= 1, four
    significant digits (``"1,335 GiB"`` from a thousand up: no digit is dropped)."""
    for size, name in _PREFIXES:
        if nbytes >= size:
            text = f"{nbytes / size:#.4g}"
            return f"{nbytes / size:,.0f} {name}" if text.endswith(".") or "e" in text else f"{text} {name}"
    return f"{nbytes:.0f} B"


def _row(label: str, values: Sequence[str]) -> str:
    return label.ljust(_LABEL_WIDTH) + "".join(v.rjust(_COLUMN_WIDTH) for v in values)


def _states(optimizer: str) -> str:
    count = OPTIMIZER_STATES[optimizer]
    return f"{count} state tensor" + ("s" if count > 1 else "")


def _describe(inputs: PlanInputs, plan: Plan) -> list[str]:
    rows = plan.method("selection").rows_computed
    choice = (f"selection {inputs.selection}, budget {inputs.budget}: {rows:,} of {inputs.shard_rows:,} "
              "rows computed per rank" if inputs.selection != "full" else "selection full: every row computed")
    return [
        f"C = {inputs.num_classes:,} classes, d = {inputs.embedding_size}, N = {inputs.world_size} ranks, "
        f"b = {inputs.local_batch} per rank, B = {inputs.global_batch:,}",
        f"weight {inputs.storage_dtype}, features {inputs.feature_dtype}, logits fp32, "
        f"optimizer {inputs.optimizer} ({_states(inputs.optimizer)}); {choice}",
        "per rank = the rank with the largest shard, ceil(C/N) rows",
        UNITS,
    ]


def render(plan: Plan, fits: Optional[int] = None, memory_gib: Optional[float] = None) -> str:
    """The plan as the text table that ``hybridfc plan`` prints."""
    inputs = plan.inputs
    names = dict(storage=inputs.storage_dtype, features=inputs.feature_dtype, optimizer=inputs.optimizer,
                 states=OPTIMIZER_STATES[inputs.optimizer])
    lines = _describe(inputs, plan) + ["", _row("", [m.label for m in plan.methods])]
    lines += [_row("classes held per rank", [f"{m.rows_held:,}" for m in plan.methods]),
              _row("classes computed per rank", [f"{m.rows_computed:,}" for m in plan.methods]),
              _row("batch rows in the logits", [f"{m.logits_batch:,}" for m in plan.methods]),
              _row(f"logits kept ({inputs.logits})", [m.logits_mode for m in plan.methods]),
              "", "memory per rank (the head's buffers at the step's peak)"]
    lines += [_row("  " + label.format(**names), [format_bytes(getattr(m.memory, key)) for m in plan.methods])
              for key, label in MEMORY_ROWS]
    lines += ["", "communication per rank per step (bytes one rank sends = receives, as the backend moves them)"]
    lines += [_row("  " + label.format(**names), [format_bytes(getattr(m.communication, key)) for m in plan.methods])
              for key, label in COMMUNICATION_ROWS]
    lines += ["", f"all logits of one step, B x C fp32 over all ranks: {format_bytes(plan.global_logits)}"]
    if fits is not None:
        label = plan.method("selection").label
        lines.append(f"largest C that fits {memory_gib:g} GiB per rank with {label}: {fits:,}")
    return "\n".join(lines)


def render_gradient_exchange(exchange: GradientExchange) -> str:
    """The backbone's gradient exchange, dense and top-k, and where top-k stops paying."""
    pairs = f"(int32, {exchange.value_dtype}) pairs"
    sparse = exchange.topk != exchange.dense
    lines = [f"backbone gradient, {exchange.parameters:,} parameters over N = {exchange.world_size} ranks "
             f"(bytes one rank sends per step)",
             _row("  dense ring all-reduce (DeepSpeed)", [format_bytes(exchange.dense)]),
             _row(f"  grad_topk {exchange.density:g} as {pairs}", [format_bytes(exchange.topk)])
             + (f"  {exchange.saving:.1f}x fewer" if sparse else "  (does not pay: hybridfc sends dense)"),
             f"  top-k pays below a density of {exchange.break_even_density:.4g} with {exchange.value_dtype} values "
             f"on {exchange.world_size} ranks (8 / ((4 + value bytes) x N))"]
    return "\n".join(lines)


def run_plan(args: argparse.Namespace) -> str:
    inputs, fits = _resolve(args)
    plan = make_plan(inputs)
    exchange = None
    if args.backbone_params is not None:
        exchange = backbone_gradient_exchange(args.backbone_params, args.world_size, args.grad_topk,
                                              args.grad_topk_value_dtype)
    if args.json:
        extra = {} if exchange is None else {"backbone_gradient": {**dataclasses.asdict(exchange),
                                                                   "saving": exchange.saving}}
        return json.dumps({"units": "bytes", **plan.to_dict(), "max_num_classes": fits,
                           "memory_gib": args.memory_gib, **extra}, indent=2)
    text = render(plan, fits, args.memory_gib)
    return text if exchange is None else f"{text}\n\n{render_gradient_exchange(exchange)}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        print(args.run(args))
    except ValueError as exc:
        args.subparser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
