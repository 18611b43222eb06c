"""fp32 against bf16 on CPU, side by side on the demo's data: training tokens/s (the real `sft-pipeline train`, a
fresh work_dir per precision sharing the prepared rows) and held-out scoring seconds (fp32 against bf16 autocast,
the same model and rows, same loss to 2 decimals).

    python benchmarks/cpu_precision.py --steps 4          # about 4 minutes on 2 cores

bf16 pays off only where the CPU has bf16 instructions (avx512_bf16 / AMX); the script prints the CPU flags it saw.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _train(work: Path, precision: str, steps: int) -> float:
    """tokens/s from the train stage's end line."""
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "train", "-c", "conf/demo.yaml", f"work_dir={work}",
         f"train.precision={precision}", f"train.max_steps={steps}", "train.warmup_steps=0"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    found = re.search(r"train: .* ([\d,.]+) tokens/s", done.stdout)
    if not found:
        raise SystemExit(f"no tokens/s in the train output:\n{done.stdout}\n{done.stderr}")
    return float(found.group(1).replace(",", ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="training steps per precision (default: %(default)s)")
    args = ap.parse_args()

    from sft_engine.evaluation.heldout import heldout_loss
    from sft_engine.evaluation.suite import inference_precision
    from sft_engine.model import load_model, resolve_model

    flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0] if Path("/proc/cpuinfo").exists() else ""
    print("cpu bf16 flags:", " ".join(f for f in ("avx512_bf16", "amx_bf16") if f in flags.split()) or "none")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "fp32"
        rate = {"fp32": _train(base, "fp32", args.steps)}
        other = Path(tmp) / "bf16"
        other.mkdir()
        for stage in ("curate", "prepare"):  # the same prepared rows: only training differs
            shutil.copytree(base / stage, other / stage)
        rate["bf16"] = _train(other, "bf16", args.steps)
        print(f"train tokens/s: fp32 {rate['fp32']:.0f}, bf16 {rate['bf16']:.0f}, ratio {rate['bf16'] / rate['fp32']:.2f}x")

        heldout = next((base / "prepare").glob("*/heldout.arrow"))
        model = load_model(resolve_model("smollm2-135m"))
        seconds, losses = {}, {}
        for precision in ("fp32", "bf16", "fp32", "bf16"):  # alternated, the second pass of each counts
            with inference_precision(precision):
                start = time.perf_counter()
                losses[precision] = heldout_loss(model, heldout, micro_batch_size=2)["loss"]
                seconds[precision] = time.perf_counter() - start
        print(f"held-out scoring s: fp32 {seconds['fp32']:.1f}, bf16 {seconds['bf16']:.1f}, "
              f"ratio {seconds['fp32'] / seconds['bf16']:.2f}x; loss fp32 {losses['fp32']:.4f}, bf16 {losses['bf16']:.4f}")


if __name__ == "__main__":
    main()
