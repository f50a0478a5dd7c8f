"""Train the denoiser on simulated low-dose / full-dose pairs of the training series.

``python -m models.train [--config models/train_config.json] [--minutes N]``

Steps: load the TRAIN_SERIES (never the held-out ones), simulate each at the configured doses
(cached in cache_dir(), so a second run starts training at once), then train on random
patches drawn with the configured dose mixture, on the GPU when torch sees one, else on the
CPU.  The last slices of each training series are kept out of the patches and used to pick
the best checkpoint.  Checkpoints and the loss history go to
``cache_dir()/checkpoints/<run>``; nothing is written to the repository.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# OpenMP threads that spin while waiting are 10x slower on a shared, oversubscribed CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

from models import SHIPPED_MODEL
from models.data import SHARED_CT, TRAIN_SERIES, cache_dir, load_series
from models.grain import phantom_profiles, real_profiles
from models.network import build, parameter_count
from models.sampler import PatchSampler
from models.simulate import SIM_VERSION, series_calibration, simulate_series
from models.validation import (
    LESION_POOLINGS,
    build_lesions,
    build_validation,
    config_score,
    lesion_contrast_kept,
    validate_by_series,
)
from node.pixels import FILL_HU

DEFAULT_CONFIG = Path(__file__).with_name("train_config.json")


def load_pairs(config: dict) -> tuple[list[dict], list[dict]]:
    """Per series: full-dose HU, keep mask and one simulated array per dose, split train/val."""
    train, val = [], []
    n_val = int(config["val_slices_per_series"])
    for name in config["train_series"]:
        if name not in TRAIN_SERIES:
            raise ValueError(f"{name} is not a training series (held-out data must stay unseen)")
        t0 = time.perf_counter()
        series = load_series(SHARED_CT / name)
        keep = series.keep
        full = np.where(keep, np.float32(FILL_HU), series.hu).astype(np.float32)
        by_dose = {}
        for dose in config["doses"]:
            low = simulate_series(series, float(dose), seed=int(config["sim_seed"]))
            by_dose[float(dose)] = np.where(keep, np.float32(FILL_HU), low).astype(np.float32)
        print(f"data {name}: {full.shape[0]} slices, {time.perf_counter() - t0:.1f} s", flush=True)
        native = series_calibration(series).native_noise_hu
        cut = full.shape[0] - n_val
        train.append(
            {
                "full": full[:cut],
                "keep": keep[:cut],
                "low": {d: a[:cut] for d, a in by_dose.items()},
                "native_hu": native if math.isfinite(native) else None,
            }
        )
        if n_val:
            val.append(
                {
                    "full": full[cut:],
                    "keep": keep[cut:],
                    "low": {d: a[cut:] for d, a in by_dose.items()},
                }
            )
    return train, val


@torch.no_grad()
def validate(
    model: torch.nn.Module, val: list[dict], config: dict, device: torch.device
) -> dict[str, float]:
    """Mean absolute error (HU, body pixels of a 256x256 centre crop) per dose."""
    model.eval()
    c = int(config["val_crop"])
    out: dict[str, float] = {}
    for dose in config["doses"]:
        errs = []
        for s in val:
            n, h, w = s["full"].shape
            y0, x0 = (h - c) // 2, (w - c) // 2
            crop = (slice(None), None, slice(y0, y0 + c), slice(x0, x0 + c))
            low = torch.from_numpy(s["low"][float(dose)][crop]).to(device)
            full = torch.from_numpy(s["full"][crop]).to(device)
            mask = torch.from_numpy(~s["keep"][crop]).to(device)
            pred = model(low)
            errs.append(float((pred - full).abs()[mask].mean()))
        out[f"{float(dose):g}"] = float(np.mean(errs))
    model.train()
    return out


def plot_history(history: dict, path: Path) -> None:
    """Training and validation loss curves as a PNG (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no loss figure", flush=True)
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=80)
    steps = [h["step"] for h in history["train"]]
    axes[0].plot(steps, [h["loss_hu"] for h in history["train"]], lw=1)
    axes[0].set(xlabel="step", ylabel="train L1 (HU, body pixels)", title="training loss")
    vsteps = [h["step"] for h in history["val"]]
    doses = (
        [k for k in history["val"][0]["mae"] if not k.startswith("lesion")]
        if history["val"]
        else []
    )
    for dose in doses:
        axes[1].plot(
            vsteps, [h["mae"][dose] for h in history["val"]], marker=".", label=f"dose {dose}"
        )
    axes[1].set(xlabel="step", ylabel="val MAE vs full dose (HU)", title="validation")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def training_device() -> torch.device:
    """The GPU when torch sees one (its convolutions in TF32, torch's default), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe(device: torch.device) -> str:
    """The machine that trains, for the log and the checkpoint."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def load_initial_weights(model: torch.nn.Module, source: str) -> str:
    """Start from a released ONNX model (a path ending in .onnx, or "shipped" for
    models.SHIPPED_MODEL) or an earlier run's best
    checkpoint (a run name), so a hospital can fine-tune the shipped model on its own series.
    Returns what was loaded, for the checkpoint and the exported model's metadata."""
    if source == "shipped":
        source = str(SHIPPED_MODEL)
    if source.endswith(".onnx"):
        import onnx
        from onnx import numpy_helper

        proto = onnx.load(source)
        wanted = model.state_dict()
        # load_state_dict names any weight the file lacks (another architecture or widths)
        model.load_state_dict(
            {
                t.name: torch.from_numpy(numpy_helper.to_array(t).copy())
                for t in proto.graph.initializer
                if t.name in wanted
            }
        )
        meta = {p.key: p.value for p in proto.metadata_props}
        return (
            f"{meta.get('name', 'model')} {meta.get('version', '')} ({source}), trained on "
            f"{meta.get('training_machine', 'an unrecorded machine')}"
        )
    path = cache_dir() / "checkpoints" / source / "best.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    return f"run {source}, step {state['step']} ({path}), trained on {state['machine']}"


def _validation(
    config: dict, val_data: list[dict]
) -> Callable[[torch.nn.Module, torch.device], dict]:
    """The validation of this config: by series (``validation_series``: models.validation)
    when it names them, with the lesion contrast kept where ``validation_lesion_weight`` is
    set, else the last slices of each training series (2.2.0's recipe)."""
    if not config.get("validation_series"):
        return lambda model, device: validate(model, val_data, config, device)
    pooling = config.get("validation_lesion_pooling", "discs")
    if pooling not in LESION_POOLINGS:
        raise ValueError(f"validation_lesion_pooling {pooling!r}: one of {LESION_POOLINGS}")
    by_series = build_validation(config)
    if not config.get("validation_lesion_weight"):
        return lambda model, device: validate_by_series(model, by_series, device)
    lesions = build_lesions(config, by_series)

    def both(model: torch.nn.Module, device: torch.device) -> dict:
        return {
            **validate_by_series(model, by_series, device),
            **lesion_contrast_kept(model, lesions, device),
        }

    return both


def _resume_state(run_dir: Path, resume: bool) -> dict | None:
    """The run's last checkpoint when resuming and one exists (else a fresh start)."""
    path = run_dir / "last.pt"
    if not (resume and path.exists()):
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def train(
    config: dict,
    minutes: float | None,
    command: str,
    resume: bool = False,
    stop_after: int | None = None,
) -> Path:
    """Load the data of one training run and :func:`fit`; return the best checkpoint's path."""
    t0 = time.perf_counter()
    train_data, val_data = load_pairs(config)
    profiles = list(phantom_profiles().values()) if config.get("grain_prob") else []
    real = real_profiles(tuple(config.get("grain_real_series") or ()))
    for name, (_, std) in real.items():
        print(f"real low-dose texture {name}: noise {std:.1f} HU", flush=True)
    validate_now = _validation(config, val_data)
    print(f"data ready in {time.perf_counter() - t0:.0f} s", flush=True)
    budget_s = (minutes if minutes is not None else float(config["minutes"])) * 60
    run = Run(command, budget_s, resume, stop_after)
    real_list = [profile for profile, _ in real.values()]
    return fit(config, train_data, profiles, validate_now, run, real_list)


def _masked_l1(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ((a - b).abs() * mask).sum() / mask.sum().clamp(min=1)


def training_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, gradient_weight: float = 0.0
) -> torch.Tensor:
    """L1 (HU) over the mask, plus ``gradient_weight`` times the L1 of the horizontal and
    vertical neighbour differences (pairs inside the mask).

    Why the second term: a pixel L1 charges a blurred 3 mm lesion or vessel edge for its few
    pixels only, and a network that cannot tell fine grain from fine anatomy then lowers its
    loss by smoothing both (session 9: 3 mm lesions kept 65-75 % against 2.2.0's 75-80 %).
    Differences are a high-pass: smoothing away real structure costs there at every pixel
    of its edge, while the target's own grain (a quarter of the extra noise) is zero-mean in
    them and the L1's median ignores it.
    """
    loss = _masked_l1(pred, target, mask)
    if gradient_weight:
        for dim in (-1, -2):
            n = pred.shape[dim] - 1
            pair = mask.narrow(dim, 0, n) * mask.narrow(dim, 1, n)
            loss = loss + gradient_weight * _masked_l1(
                pred.diff(dim=dim), target.diff(dim=dim), pair
            )
    return loss


@dataclass(frozen=True)
class Run:
    """How this invocation runs: its command line (recorded), the time budget of the whole
    run in seconds, whether to continue from the last checkpoint, and an optional number of
    steps after which this invocation stops (the next one resumes)."""

    command: str
    budget_s: float
    resume: bool = False
    stop_after: int | None = None


def fit(
    config: dict,
    train_data: list[dict],
    profiles: list[np.ndarray],
    validate_now: Callable[[torch.nn.Module, torch.device], dict],
    run: Run,
    real_textures: list[np.ndarray] | None = None,
) -> Path:
    """Train (or continue from the last checkpoint); return the best checkpoint's path.

    The checkpoint ``last.pt`` (every ``save_every`` steps and at each validation) holds the
    weights, the optimizer, the sampler's random state, the history and the training time
    so far, so a run stopped at any point loses at most ``save_every`` steps; the time
    budget and the step count are over the whole run, resumes included.  ``real_textures``
    are the radial NPS of real low-dose series that grain patches may take (PatchSampler).
    """
    torch.set_num_threads(int(config["threads"]))
    torch.manual_seed(int(config["seed"]))
    device = training_device()
    run_dir = cache_dir() / "checkpoints" / config["run_name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sampler = PatchSampler(train_data, config, device, int(config["seed"]), profiles, real_textures)
    model = build(config.get("model"))
    opt = torch.optim.AdamW(
        model.parameters(), lr=float(config["lr"]), weight_decay=float(config["weight_decay"])
    )
    state = _resume_state(run_dir, run.resume)
    history: dict = {"train": [], "val": []}
    best, best_path = float("inf"), run_dir / "best.pt"
    first_step, done_s = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sampler.generator.set_state(state["generator"])
        history, best, base = state["history"], state["best_score"], state["base_model"]
        first_step, done_s = int(state["step"]), float(state["train_time_s"])
        print(f"resumed {run_dir / 'last.pt'} at step {first_step}", flush=True)
    else:
        base = load_initial_weights(model, config["init_from"]) if config.get("init_from") else ""
        if base:
            print(f"initialised from {base}", flush=True)
    model.to(device)
    print(f"model: {parameter_count(model)} parameters on {describe(device)}", flush=True)
    steps = int(config["max_steps"])
    warmup = int(config["warmup_steps"])
    lr_min = float(config["lr_min"])
    budget_s = run.budget_s
    save_every = int(config.get("save_every") or config["val_every"])
    gradient_weight = float(config.get("gradient_weight") or 0.0)

    def lr_at(step: int, elapsed: float) -> float:
        # cosine over the wall-clock budget: the machine is shared, so steps/s is unknown
        if step < warmup:
            return float(config["lr"]) * (step + 1) / warmup
        frac = min(1.0, max(elapsed / budget_s, step / steps))
        return lr_min + 0.5 * (float(config["lr"]) - lr_min) * (1 + math.cos(math.pi * frac))

    def record(step: int, elapsed: float, mae: dict | None) -> dict:
        return {
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": opt.state_dict(),
            "generator": sampler.generator.get_state(),
            "history": history,
            "best_score": best,
            "config": config,
            "step": step,
            "val": mae,
            "command": run.command,
            "sim_version": SIM_VERSION,
            "wall_time_s": time.perf_counter() - t0,
            "train_time_s": elapsed,
            "parameters": parameter_count(model),
            "base_model": base,
            "machine": f"{platform.node()} {describe(device)}, torch {torch.__version__}",
        }

    def save(path: Path, content: dict) -> None:
        tmp = path.with_suffix(".tmp")
        torch.save(content, tmp)
        tmp.replace(path)

    start = time.perf_counter() - done_s
    running: torch.Tensor | float = 0.0
    count = 0
    step = first_step
    lr = 0.0
    for step in range(first_step, steps):
        lr = lr_at(step, time.perf_counter() - start)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y, m = sampler.draw()
        pred = model(x)
        loss = training_loss(pred, y, m, gradient_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += loss.detach()  # a tensor: no GPU sync per step
        count += 1
        elapsed = time.perf_counter() - start
        last = step + 1 == steps or elapsed > budget_s or step + 1 - first_step == run.stop_after
        if (step + 1) % int(config["log_every"]) == 0 or last:
            history["train"].append(
                {
                    "step": step + 1,
                    "loss_hu": float(running) / count,
                    "lr": lr,
                    "elapsed_s": elapsed,
                }
            )
            print(
                f"step {step + 1}/{steps} loss {float(running) / count:.2f} HU "
                f"lr {lr:.2e} {(elapsed - done_s) / (step + 1 - first_step):.3f} s/step "
                f"elapsed {elapsed / 60:.1f} min",
                flush=True,
            )
            running, count = 0.0, 0
        if (step + 1) % int(config["val_every"]) == 0 or last:
            mae = validate_now(model, device)
            score = config_score(mae, config)
            history["val"].append({"step": step + 1, "mae": mae, "score": score})
            print(f"  val {json.dumps(mae)} score {score:.3f}", flush=True)
            if score < best:
                best = score
                save(best_path, record(step + 1, elapsed, mae))
                print(f"  new best checkpoint at step {step + 1}", flush=True)
            save(run_dir / "last.pt", record(step + 1, elapsed, mae))
            (run_dir / "history.json").write_text(json.dumps(history, indent=1))
            plot_history(history, run_dir / "loss.png")
        elif (step + 1) % save_every == 0:
            save(run_dir / "last.pt", record(step + 1, elapsed, None))
        if last:
            if elapsed > budget_s:
                print(f"time budget of {budget_s / 60:.0f} min reached at step {step + 1}")
            break
    print(
        f"done: {step + 1} steps, training {time.perf_counter() - start:.0f} s, "
        f"this invocation {time.perf_counter() - t0:.0f} s; best {best_path}",
        flush=True,
    )
    return best_path


def main(argv: list[str] | None = None) -> int:
    """Command line entry: read the config, train, print where the best checkpoint is."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="wall-clock budget for the training loop (default: config)",
    )
    parser.add_argument(
        "--stage", type=int, default=None, help="run only this stage (1-based) of the config"
    )
    parser.add_argument(
        "--init-from",
        default=None,
        help="start the first stage run from this ONNX model or run name instead of its "
        "config's init_from (later stages start from the stage before, as configured)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue each stage's run from its last checkpoint (weights, optimizer, step, "
        "random state), where one exists",
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop this invocation after this many steps (checkpointed; --resume continues)",
    )
    parser.add_argument(
        "--validate-only",
        action="store_true",
        help="print the validation figures and score of each stage's starting model "
        "(init_from, or --init-from) instead of training",
    )
    args = parser.parse_args(argv)
    raw = json.loads(args.config.read_text())
    command = "python -m models.train " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    for config in stage_configs(raw, args.stage, args.init_from):
        print(
            f"stage {config['stage']}/{len(raw.get('stages', [{}]))}: {config['run_name']}",
            flush=True,
        )
        if args.validate_only:
            print(json.dumps(validation_report(config), indent=1), flush=True)
        else:
            train(config, args.minutes, command, args.resume, args.stop_after)
    return 0


def validation_report(config: dict) -> dict:
    """The validation figures and selection score of the config's starting model (a
    baseline for its run: 2.2.0 for a fine-tune of the shipped model)."""
    if not config.get("validation_series"):
        raise ValueError("--validate-only needs validation_series in the config")
    torch.set_num_threads(int(config["threads"]))
    model = build(config.get("model"))
    base = load_initial_weights(model, config["init_from"])
    found = _validation(config, [])(model, torch.device("cpu"))
    return {"model": base, "val": found, "score": config_score(found, config)}


def stage_configs(raw: dict, stage: int | None, init_from: str | None) -> list[dict]:
    """The configs of the stages to run (all, or the 1-based ``stage``), each the top-level
    keys with its stage's on top.  ``init_from`` replaces the first one's starting point only:
    a later stage keeps its own (the stage before it), or it would throw that stage away."""
    stages = raw.get("stages", [{}])
    shared = {k: v for k, v in raw.items() if k != "stages"}
    chosen = range(len(stages)) if stage is None else [stage - 1]
    configs = [{**shared, **stages[i], "stage": i + 1} for i in chosen]
    if init_from:
        configs[0]["init_from"] = init_from
    return configs


if __name__ == "__main__":
    raise SystemExit(main())
