"""How long a large catalogue takes to validate and price offline: `python -m benchmarks.catalogue
[ROWS] [STYLES]` writes ROWS rows (default 10,000) times STYLES matrix values (default 2) to a
temporary folder and times `imagegen validate` and the offline estimate, with peak memory."""

from __future__ import annotations

import csv
import resource
import sys
import tempfile
import time
from datetime import date
from pathlib import Path


def write(folder: Path, rows: int, styles: int) -> Path:
    with (folder / "products.csv").open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["sku", "name", "color"])
        out.writerows([f"SKU-{n:06d}", f"product {n}", "red"] for n in range(rows))
    spec = folder / "catalogue.yaml"
    spec.write_text(f"""\
version: 1
name: catalogue-bench
provider: tams
generate: {{width: 512, height: 512, steps: 20, sampler: "Euler a"}}
items_from: {{path: products.csv, id: "{{sku}}-{{style}}", prompt: "a {{color}} {{name}}, {{style}} photo"}}
matrix: {{style: [{", ".join(f"s{n}" for n in range(styles))}]}}
archive: {{bucket: imagegen-demo, credentials: sandbox}}
""")
    return spec


def main() -> None:
    rows, styles = (int(a) for a in (sys.argv[1:] + ["10000", "2"])[:2])
    from flows.pipeline import estimate_plans, plan_items, preflight
    from flows.specs.spec import load_spec

    with tempfile.TemporaryDirectory() as tmp:
        spec_path = write(Path(tmp), rows, styles)
        started = time.perf_counter()
        spec = load_spec(spec_path)
        plans = plan_items(spec, "", date.today(), "")
        preflight(plans, spec_path)
        validated = time.perf_counter() - started
        per_provider, _ = estimate_plans(plans, offline={})
        estimated = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{rows} rows x {styles} styles = {len(plans)} items: validated in {validated:.1f} s, "
          f"validated and priced in {estimated:.1f} s, peak RSS {peak:.0f} MB; {per_provider}")


if __name__ == "__main__":
    main()
