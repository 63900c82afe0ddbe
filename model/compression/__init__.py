"""Mechanistic compression of a DenseNet: exact channel elimination, then least-squares reconstruction.

Why this shape. A DenseNet layer reads *every* channel produced before it in its block, so most of
its parameters sit in the 1x1 ``conv1`` of each layer (58 % in DenseNet121) and in the 3x3
``conv2`` behind a 128-wide bottleneck (31 %). Each of those convolutions is linear in the
post-BN-ReLU activations it reads, so dropping some of its inputs and re-fitting its weights by
least squares to reproduce its *original* output on calibration images loses little when the
inputs are redundant -- and nothing when they are dead, constant or linearly dependent.

Stages (all on calibration images; fidelity is measured on images that were not fitted):

1. **Exact**: per consumer, input channels that are dead after BN-ReLU, constant (folded into a
   bias, which lands in the next batch norm's running mean) or linearly dependent on the others
   (folded into the remaining weights) are removed, to float tolerance.
2. **Reconstruction**: per consumer (dense-layer ``conv1`` inputs, the bottleneck = ``conv2``
   inputs, transitions, ``norm5`` + classifier) a subset of inputs is chosen by backward
   elimination on the least-squares problem (ThiNet / He et al. 2017 family; groups of 9 columns
   for the 3x3 convolution) and the weights are re-fitted (ridge towards the original weights) to
   reproduce the original output. Layers are processed in order, each fitted on the activations
   of the *already compressed* prefix, so errors do not compound. Errors are weighted by a
   gradient sensitivity (how much a unit error on that channel moves the logits) and per-layer
   budgets come from one global trade-off (error per parameter, Lagrangian allocation over the
   layers' elimination curves), so the reduction is spent where reconstruction is cheap. With
   tolerances, whole target passes are judged on a patient-disjoint held-out part of the
   calibration data by intervals, not points (the flip rate's Wilson bound; paired-bootstrap
   ΔAUROC intervals, pooled and per label: :mod:`model.compression.tolerance`) and a bisection
   finds the largest reduction that stays inside them (a target given with tolerances caps it).
3. **Surgery**: produced channels that no consumer reads any more are removed physically (rows of
   ``conv2`` / transition convolutions / ``conv0``), layers that produce nothing disappear, and
   the result is a :class:`model.nets.pruned.PrunedDenseNet`.

The bundle's ``history`` gets one ``compress`` entry: the calibration manifest hash, seed and
sampling settings, and per consumer the kept input channels and bottleneck (in the parent's
channel coordinates). :func:`replay_compression` rebuilds the compressed weights from the parent
and the same calibration images by re-running the (deterministic) re-fits with those index sets
-- small to store, unlike deltas of weights that are all re-fitted. Replay is bit-identical with
the same torch build and thread count (BLAS reductions may round differently elsewhere).
:func:`refit_to_parent` is the same re-fit on *new* images (the ``f_reopt`` intervention).

Surgery is written here, not with torch-pruning: its dependency graph handles DenseNet's
concatenations by removing a produced channel from *every* consumer at once, so it cannot give
each consumer its own subset, and it does not re-fit weights. It is the baseline in
``bench/bench_compress.py``.
"""

# The package's parts, in the order a compression runs through them: settings, calibration,
# statistics + least_squares (the re-fits), passes (forward passes, sampling), walk + modes (the
# consumer-by-consumer pass), allocation (budgets), tolerance (the criteria), search
# (planning, target passes, the tolerance search), surgery, distill, measure, accepted (the
# fidelity record a compressed bundle carries), history (replay), api (entry points).

from model.compression.api import CompressResult, compress_bundle, compress_targets
from model.compression.calibration import Calibration, prepare_calibration
from model.compression.history import latest_plan, refit_to_parent, replay_compression
from model.compression.measure import compression_report, count_macs, fidelity, measure_speeds
from model.compression.passes import consumer_names
from model.compression.settings import CompressSettings
from model.compression.surgery import surgery

__all__ = [
    "CompressSettings",
    "CompressResult",
    "Calibration",
    "prepare_calibration",
    "compress_bundle",
    "compress_targets",
    "replay_compression",
    "refit_to_parent",
    "latest_plan",
    "consumer_names",
    "surgery",
    "count_macs",
    "measure_speeds",
    "fidelity",
    "compression_report",
]
