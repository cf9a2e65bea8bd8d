"""RSS of a process that exports one head after another, as a base station does once per round.

``--exporter writer`` runs ``models.export.head_to_tflite``, which writes the
flatbuffer itself. ``--exporter converter`` runs TensorFlow's TFLiteConverter
on the same head, as the exporter did before (tests/tensorflow_converter.py).
Each call exports a slightly different head of ``--classes`` classes, and the
RSS after a garbage collection is printed every ``--report-every`` calls.

Usage:

    .venv/bin/python benchmarks/export_memory.py --exporter converter --calls 1200
    .venv/bin/python benchmarks/export_memory.py --exporter writer --calls 1200
"""

from __future__ import annotations

import argparse
import gc
import os
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]

# Calls before the first RSS reading, so that imports and first-call caches are not counted.
_WARMUP_CALLS = 10


def resident_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS line in /proc/self/status: this benchmark needs Linux")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exporter", choices=("writer", "converter"), default="writer",
                        help="writer: head_to_tflite; converter: TensorFlow's TFLiteConverter (default writer)")
    parser.add_argument("--calls", type=int, default=1200, help="heads exported after the warm-up (default 1200)")
    parser.add_argument("--classes", type=int, default=199, help="classes of the head (default 199)")
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp16",
                        help="precision of the exported heads (default fp16)")
    parser.add_argument("--report-every", type=int, default=200, help="calls between RSS readings (default 200)")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.report_every < 1 or args.classes < 1:
        raise SystemExit("--calls, --report-every and --classes must be at least 1")

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from dawnchorus.models.head import LinearHead

    if args.exporter == "writer":
        from dawnchorus.models.export import head_to_tflite as export
    else:
        # The converter is kept with the tests, which compare the writer's heads with it.
        sys.path.insert(0, str(REPO / "tests"))
        from tensorflow_converter import convert as export

    rng = np.random.default_rng(0)
    head = LinearHead([f"Species {i}_Bird {i}" for i in range(args.classes)],
                      rng.normal(0.0, 0.05, size=(args.classes, 1024)).astype(np.float32),
                      rng.normal(0.0, 0.5, size=args.classes).astype(np.float32), version=1)
    for _ in range(_WARMUP_CALLS):
        export(head, args.precision)
    gc.collect()
    start_mib = resident_mib()
    started = time.perf_counter()

    print(f"{args.exporter}, {args.classes} classes, {args.precision}: RSS {start_mib:.1f} MiB after "
          f"{_WARMUP_CALLS} calls")
    for call in range(1, args.calls + 1):
        # Another head each time, as each round of a station trains a new one.
        head.bias[0] = call * 1e-3
        export(head, args.precision)
        if call % args.report_every == 0 or call == args.calls:
            gc.collect()
            growth = resident_mib() - start_mib
            print(f"{call:6d} calls: RSS {growth:+7.1f} MiB, {growth * 1024 / call:6.1f} KiB per call, "
                  f"{(time.perf_counter() - started) / call * 1000:5.1f} ms per call", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
