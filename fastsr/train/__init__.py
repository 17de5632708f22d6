"""fastsr.train: the paper's training recipe (Lim et al. 2017) with the fused ops on.

L1 loss; Adam(0.9, 0.999, 1e-8); lr 1e-4 halved every 2e5 updates (StepLR); batch 16 of
48x48 LR patches with flips and 90-degree rotations; x3/x4 EDSR start from x2 weights
(`init_from`); MDSR draws one scale per batch. Around it: AMP, EMA, gradient clipping,
validation under the papers' protocol with the best weights kept, CSV/JSON logs and a
plot, checkpoints that never lose work and resume bitwise-exactly on the CPU, Ctrl-C that
saves, and DDP under torchrun.

Faults: every file is written atomically (a kill at any moment leaves the previous last.pt;
a resume drops the log rows past it and removes the kill's temp files); a full disk stops
the run with a one-line error naming the file, the previous last.pt intact; a NaN/inf loss
is checked every step (agreed across DDP ranks) and handled by `nan_policy`: "stop" (the
default) fails naming the step, "skip" drops that update and counts it (`skipped_steps` in
the logs, checkpoint and result.json) until `nan_max_consecutive` in a row.

    fastsr train -c edsr_baseline_x2 [--set key=value ...]     (a packaged config, or -c FILE)
    fastsr train --resume out/edsr_baseline_x2 [--steps N]    (continue in place, saved config)
    torchrun --nproc-per-node 2 -m fastsr.train -c ... (batch_size is the global batch)

AMP: with fused=True, `amp` sets the fused model's compute dtype (what torch.autocast
around it would choose too, with the image kept fp32 in and out); with fused=False it is
torch.autocast. fp16 adds a GradScaler.
Weights, optimizer state and the loss stay float32 either way.

Run folder (`out_dir`): config.toml (the resolved config), last.pt (the resumable state),
best.safetensors (best validation PSNR), final.safetensors, log.csv + log.jsonl, curves.png,
result.json.

The package, one concern per module:

    config       TrainConfig, TOML / --set parsing, packaged configs, data-folder checks
    distributed  torchrun ranks and the collectives the loop needs
    state        the network from a config, EMA, checksums, RNG state
    validation   the papers' protocol on a validation folder or split
    runfiles     atomic writes, logs and curves, last.pt
    resume       what --resume continues and the checks a resumed config passes
    loop         train(): build the run, step, validate, checkpoint, finish
    results      StepInfo and TrainResult
    cli          `fastsr train` / `python -m fastsr.train`
"""
from fastsr.train.cli import add_arguments, main, run_cli
from fastsr.train.config import ConfigError, TrainConfig, check_data_folders, load_config
from fastsr.train.loop import train
from fastsr.train.results import StepInfo, TrainResult
from fastsr.train.runfiles import CHECKPOINT_FORMAT, load_train_checkpoint
from fastsr.train.state import build_model, model_scales, weights_checksum
from fastsr.train.validation import Validator

__all__ = [
    "CHECKPOINT_FORMAT", "ConfigError", "StepInfo", "TrainConfig", "TrainResult", "Validator", "add_arguments",
    "build_model", "check_data_folders", "load_config", "load_train_checkpoint", "main",
    "model_scales", "run_cli", "train", "weights_checksum",
]
