"""The end-to-end demo on an embedded dataset, as named stages (one module per concern:
:mod:`.settings`, :mod:`.state`, :mod:`.stages`, :mod:`.evaluation`, :mod:`.run`).

``repblend-fast demo --out DIR`` (:func:`run_demo`) runs the whole pipeline on the embedded
``emoji`` dataset (Twemoji images with their CLDR names) with the packaged EfficientNet-Lite0 and
MiniLM encoders:

1. :func:`stage_load`: the data splits and the frozen encoders;
2. :func:`stage_features`: frozen-encoder features of the train and test splits (cached on disk);
3. :func:`stage_experts` and :func:`stage_distill`, per method: RepBlend experts (image and text
   heads on the cached features) and RepBlend distillation of ``N`` pairs (the ``demo`` preset,
   N = 99 as the paper counts "100 pairs"); then LoRS experts (the whole image encoder is trained)
   and LoRS-mode distillation — deliberately small on a CPU, see :class:`DemoSettings`;
4. :func:`stage_evaluate`: the docs/algorithm.md §8 evaluation of both distilled sets, of random,
   herding and k-center subsets of ``N`` real pairs and of the full training split;
5. :func:`stage_diagnostics`: modality-collapse diagnostics (docs/algorithm.md §9) of each set;
6. :func:`stage_report`: ``metrics.json``, ``report.md`` and the figures
   (:mod:`repblend_fast.report`).

Expert stores live in the cache directory (``<cache>/experts/<key>``), keyed by everything that
produced them, so a rerun reuses features and experts and only distils and evaluates again.
"""

from repblend_fast.demo.evaluation import nearest_captions
from repblend_fast.demo.run import check_out, run_demo
from repblend_fast.demo.settings import FORMAT_VERSION, LABELS, DemoSettings
from repblend_fast.demo.state import DemoRun, StageClock

__all__ = [
    "FORMAT_VERSION",
    "LABELS",
    "DemoRun",
    "DemoSettings",
    "StageClock",
    "check_out",
    "nearest_captions",
    "run_demo",
]
