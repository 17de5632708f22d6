"""Package trained EDSR-baseline weights as the shipped defaults, with a model card.

    python scripts/ship_weights.py out/edsr_baseline_x2 out/edsr_baseline_x3 out/edsr_baseline_x4

For each run folder: reads best.safetensors (or final.safetensors), writes
fastsr/weights/edsr_baseline_x{s}.safetensors in fp16, evaluates the shipped fp16 file on
Set5 and Set14 against bicubic with the papers' protocol (fastsr eval), and writes
fastsr/weights/MODEL_CARD.md from the run's config, log and result. It refuses to ship a
scale whose weights do not beat bicubic on Set5.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import sys
from pathlib import Path

import torch

from fastsr.checkpoints import model_from_checkpoint, save_safetensors
from fastsr.cli import main as cli_main
from fastsr.weights import WEIGHTS_DIR

REPO = Path(__file__).resolve().parents[1]
SETS = ("Set5", "Set14")


def evaluate(dataset: Path, scale: int, weights: Path | None) -> dict:
    argv = ["eval", str(dataset), "-s", str(scale), "--json"] + (["--weights", str(weights)] if weights else ["--bicubic"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli_main(argv)
    if status != 0:
        raise SystemExit(f"fastsr eval failed on {dataset} x{scale} (exit {status})")
    return json.loads(out.getvalue())


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="training run folders (out/<name>)")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="folder holding Set5/Set14")
    args = p.parse_args()
    sections, table = [], []
    for run in args.runs:
        source = run / "best.safetensors"
        if not source.is_file():
            source = run / "final.safetensors"
        config = (run / "config.toml").read_text()
        result = json.loads((run / "result.json").read_text()) if (run / "result.json").is_file() else {}
        model = model_from_checkpoint(source)
        scale = model.scale
        target = WEIGHTS_DIR / f"edsr_baseline_x{scale}.safetensors"
        tmp = run / f"shipped_x{scale}.safetensors"
        save_safetensors(model, tmp, half=True, extra_metadata={"source": "fastsr train on scikit-image photos"})
        scores = {}
        for name in SETS:
            ours, bic = evaluate(args.data / name, scale, tmp), evaluate(args.data / name, scale, None)
            o, b = ours["results"][0], bic["results"][0]
            scores[name] = (o["psnr"], b["psnr"], o["ssim"], b["ssim"])
        gain = scores["Set5"][0] - scores["Set5"][1]
        if gain <= 0:
            print(f"x{scale}: {gain:+.3f} dB against bicubic on Set5: not shipped", file=sys.stderr)
            continue
        tmp.replace(target)
        for name, (o, b, os_, bs) in scores.items():
            table.append(f"| x{scale} | {name} | {o:.2f} | {b:.2f} | {o - b:+.2f} | {os_:.4f} | {bs:.4f} |")
        sections.append(
            f"### x{scale}\n\n- source run: `{run}` ({source.name}); steps: {result.get('step', '?')}, "
            f"training time: {result.get('train_seconds', 0) / 60:.0f} min, steps/s: {result.get('steps_per_s', 0):.2f}\n"
            f"- resolved config:\n\n```toml\n{config.strip()}\n```\n"
        )
        print(f"x{scale}: shipped {target.name}; Set5 {scores['Set5'][0]:.2f} dB vs bicubic {scores['Set5'][1]:.2f}")
    if not table:
        return 1
    card = f"""# Shipped weights: EDSR-baseline x2 / x3 / x4

Files: `edsr_baseline_x{{2,3,4}}.safetensors` (fp16, official EDSR-PyTorch key layout,
architecture in the safetensors metadata). They are the default of `fastsr upscale`.

## Data

Trained only on redistributable photos that scikit-image ships (public domain / CC0 per
`skimage/data/README.txt`; `python scripts/make_train_photos.py` copies them): astronaut,
coffee, chelsea, rocket, hubble_deep_field, retina, ihc. Seven photos, three of them JPEGs:
far less than DIV2K's 800 images, so these weights are a working default, not the paper's
model. LR made on the fly with fastsr's MATLAB-compatible bicubic.

## Recipe

`fastsr train` with the paper's recipe (L1, Adam 0.9/0.999/1e-8, random flips and
rotations, batch 16, x3/x4 initialized from the x2 weights except the upsampler), shortened
for a CPU budget: fewer steps, 32x32 LR patches, a higher learning rate (see each config
below), bf16 compute through fastsr's fused CPU path. Hardware: {cpu_name()}, 2 cores, no
GPU; torch {torch.__version__}.

## Results (papers' protocol: Y channel, shave = scale; the shipped fp16 files)

| scale | set | PSNR (dB) | bicubic | gain | SSIM | bicubic SSIM |
|---|---|---|---|---|---|---|
{chr(10).join(table)}

Set5 doubled as the validation set that picked `best.safetensors` (Set14 was never seen
during training). Measured with `python scripts/ship_weights.py` (which runs `fastsr eval`); the paper's
EDSR-baseline (DIV2K, 3e5+ steps on GPUs) reaches 37.99 / 34.36 / 32.09 dB on Set5.

## Runs

{chr(10).join(sections)}
"""
    (WEIGHTS_DIR / "MODEL_CARD.md").write_text(card)
    print(f"wrote {WEIGHTS_DIR / 'MODEL_CARD.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
