"""MVTec AD evaluation harness: dataset reading, shot selection, metrics, runner, report, plots.

Typical use (what ``clipshot eval`` does)::

    result = run_protocol(root, detector, make_adapter, mode="memory", shots=[0, 1, 4], seeds=[0, 1])
    write_outputs(out_dir, result, command=sys.argv, settings={"backbone": spec})
"""

from __future__ import annotations

from .dataset import (
    DatasetError,
    Sample,
    list_categories,
    list_test_samples,
    list_train_good,
    load_image,
    load_mask,
    parse_mask_size,
)
from .metrics import (
    QUALITY_METRICS,
    aupro,
    compute_metrics,
    image_auroc,
    image_f1max,
    pixel_auroc,
    pixel_f1max,
    pro_curve,
)
from .protocol import Example, ProtocolResult, predict_all, run_protocol
from .report import ALL_METRICS, aggregate, markdown_table, write_outputs, write_results
from .shots import select_shots, shot_permutation

__all__ = [
    "ALL_METRICS", "QUALITY_METRICS", "DatasetError", "Example", "ProtocolResult", "Sample",
    "aggregate", "aupro", "compute_metrics", "image_auroc", "image_f1max", "list_categories",
    "list_test_samples", "list_train_good", "load_image", "load_mask", "markdown_table",
    "parse_mask_size", "pixel_auroc", "pixel_f1max", "predict_all", "pro_curve", "run_protocol",
    "select_shots", "shot_permutation", "write_outputs", "write_results",
]
