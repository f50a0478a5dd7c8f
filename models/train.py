"""Train the denoiser on simulated low-dose / full-dose pairs of the training series.

``python -m models.train [--config models/train_config.json] [--minutes N]``

Steps: load the TRAIN_SERIES (never the held-out ones), simulate each at the configured doses
(cached in cache_dir(), so a second run starts training at once), then train on random
patches with a dose mixture that includes full dose (target = input, so the model learns to
leave full-dose images alone).  The last slices of each training series are kept out of the
patches and used to pick the best checkpoint.  Checkpoints and the loss history go to
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
from pathlib import Path

import numpy as np

# OpenMP threads that spin while waiting are 10x slower on a shared, oversubscribed CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
from scipy.ndimage import gaussian_filter  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from models.data import SHARED_CT, TRAIN_SERIES, cache_dir, load_series
from models.network import build, parameter_count
from models.simulate import SIM_VERSION, simulate_series
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
        cut = full.shape[0] - n_val
        train.append(
            {
                "full": full[:cut],
                "keep": keep[:cut],
                "low": {d: a[:cut] for d, a in by_dose.items()},
            }
        )
        val.append(
            {
                "full": full[cut:],
                "keep": keep[cut:],
                "low": {d: a[cut:] for d, a in by_dose.items()},
            }
        )
    return train, val


def sample_batch(
    data: list[dict], config: dict, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random patches (input, target, loss mask) with random dose, flips and 90-degree turns."""
    size, batch = int(config["patch"]), int(config["batch"])
    doses = [float(d) for d in config["doses"]]
    weights = np.asarray(config["dose_weights"], dtype=np.float64)
    weights /= weights.sum()
    xs, ys, ms = [], [], []
    while len(xs) < batch:
        s = data[rng.integers(len(data))]
        n, h, w = s["full"].shape
        i, y, x = rng.integers(n), rng.integers(h - size + 1), rng.integers(w - size + 1)
        target = s["full"][i, y : y + size, x : x + size]
        body = (target > -900).mean()
        if body < 0.2 and rng.random() > 0.05:
            continue  # mostly air or outside the field of view: rarely worth a patch
        dose = doses[rng.choice(len(doses), p=weights)]
        inp = s["low"][dose][i, y : y + size, x : x + size]
        if dose < 1 and config.get("keep_extra_noise"):
            # Aim at a full-dose look, not below it: the best estimate of the full-dose image
            # also removes most of its grain (a plastic texture); keeping a fraction of the
            # extra noise in the target lands the output near full-dose noise instead.
            target = target + float(config["keep_extra_noise"]) * (inp - target)
        mask = ~s["keep"][i, y : y + size, x : x + size]
        if rng.random() < float(config["scale_prob"]):
            # Quieter scanners: shrink the detail (noise and fine contrast) around a smooth
            # local mean, so the model sees noise levels below those of the training series.
            lo, hi = config["scale_range"]
            k = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
            smooth = gaussian_filter(target, float(config["scale_sigma"]), mode="nearest")
            inp = np.where(mask, smooth + k * (inp - smooth), FILL_HU).astype(np.float32)
            target = np.where(mask, smooth + k * (target - smooth), FILL_HU).astype(np.float32)
        k = int(rng.integers(4))
        flip = bool(rng.integers(2))
        arrays = []
        for a in (inp, target, mask):
            a = np.rot90(a, k)
            arrays.append(np.ascontiguousarray(a[:, ::-1] if flip else a))
        xs.append(arrays[0])
        ys.append(arrays[1])
        ms.append(arrays[2])
    return (np.stack(xs)[:, None], np.stack(ys)[:, None], np.stack(ms)[:, None].astype(np.float32))


@torch.no_grad()
def validate(model: torch.nn.Module, val: list[dict], config: dict) -> dict[str, float]:
    """Mean absolute error (HU, body pixels of a 256x256 centre crop) per dose."""
    model.eval()
    c = int(config["val_crop"])
    out: dict[str, float] = {}
    for dose in config["doses"]:
        errs = []
        for s in val:
            n, h, w = s["full"].shape
            y0, x0 = (h - c) // 2, (w - c) // 2
            low = torch.from_numpy(s["low"][float(dose)][:, None, y0 : y0 + c, x0 : x0 + c])
            full = torch.from_numpy(s["full"][:, None, y0 : y0 + c, x0 : x0 + c])
            mask = torch.from_numpy(~s["keep"][:, None, y0 : y0 + c, x0 : x0 + c])
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
    for dose in history["val"][0]["mae"] if history["val"] else []:
        axes[1].plot(
            vsteps, [h["mae"][dose] for h in history["val"]], marker=".", label=f"dose {dose}"
        )
    axes[1].set(xlabel="step", ylabel="val MAE vs full dose (HU)", title="validation")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def train(config: dict, minutes: float | None, command: str) -> Path:
    """Run one training; return the path of the best checkpoint."""
    torch.set_num_threads(int(config["threads"]))
    torch.manual_seed(int(config["seed"]))
    rng = np.random.default_rng(int(config["seed"]))
    run_dir = cache_dir() / "checkpoints" / config["run_name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_data, val_data = load_pairs(config)
    prep_s = time.perf_counter() - t0
    print(f"data ready in {prep_s:.0f} s", flush=True)

    model = build(config.get("model"))
    if config.get("init_from"):
        init = cache_dir() / "checkpoints" / config["init_from"] / "best.pt"
        model.load_state_dict(torch.load(init, map_location="cpu", weights_only=False)["model"])
        print(f"initialised from {init}", flush=True)
    print(f"model: {parameter_count(model)} parameters", flush=True)
    opt = torch.optim.AdamW(
        model.parameters(), lr=float(config["lr"]), weight_decay=float(config["weight_decay"])
    )
    steps = int(config["max_steps"])
    warmup = int(config["warmup_steps"])
    lr_min = float(config["lr_min"])
    budget_s = (minutes if minutes is not None else float(config["minutes"])) * 60

    def lr_at(step: int, elapsed: float) -> float:
        # cosine over the wall-clock budget: the machine is shared, so steps/s is unknown
        if step < warmup:
            return float(config["lr"]) * (step + 1) / warmup
        frac = min(1.0, max(elapsed / budget_s, step / steps))
        return lr_min + 0.5 * (float(config["lr"]) - lr_min) * (1 + math.cos(math.pi * frac))

    history: dict = {"train": [], "val": []}
    best, best_path = float("inf"), run_dir / "best.pt"
    start = time.perf_counter()
    running, count = 0.0, 0
    step = 0
    lr = 0.0
    for step in range(steps):
        lr = lr_at(step, time.perf_counter() - start)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y, m = (torch.from_numpy(a) for a in sample_batch(train_data, config, rng))
        pred = model(x)
        loss = (F.l1_loss(pred, y, reduction="none") * m).sum() / m.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += float(loss)
        count += 1
        elapsed = time.perf_counter() - start
        last = step + 1 == steps or elapsed > budget_s
        if (step + 1) % int(config["log_every"]) == 0 or last:
            history["train"].append(
                {"step": step + 1, "loss_hu": running / count, "lr": lr, "elapsed_s": elapsed}
            )
            print(
                f"step {step + 1}/{steps} loss {running / count:.2f} HU "
                f"lr {lr:.2e} {elapsed / (step + 1):.3f} s/step "
                f"elapsed {elapsed / 60:.1f} min",
                flush=True,
            )
            running, count = 0.0, 0
        if (step + 1) % int(config["val_every"]) == 0 or last:
            mae = validate(model, val_data, config)
            score = float(np.mean(list(mae.values())))
            history["val"].append({"step": step + 1, "mae": mae, "score": score})
            print(f"  val MAE (HU) {json.dumps(mae)} mean {score:.3f}", flush=True)
            record = {
                "model": model.state_dict(),
                "config": config,
                "step": step + 1,
                "val": mae,
                "command": command,
                "sim_version": SIM_VERSION,
                "wall_time_s": time.perf_counter() - t0,
                "train_time_s": elapsed,
                "parameters": parameter_count(model),
                "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                f"torch {torch.__version__}, {config['threads']} threads",
            }
            torch.save(record, run_dir / "last.pt")
            if score < best:
                best = score
                torch.save(record, best_path)
                print(f"  new best checkpoint at step {step + 1}", flush=True)
            (run_dir / "history.json").write_text(json.dumps(history, indent=1))
            plot_history(history, run_dir / "loss.png")
        if last:
            if elapsed > budget_s:
                print(f"time budget of {budget_s / 60:.0f} min reached at step {step + 1}")
            break
    total = time.perf_counter() - t0
    print(
        f"done: {step + 1} steps, training {time.perf_counter() - start:.0f} s, "
        f"total wall {total:.0f} s (data {prep_s:.0f} s); best {best_path}",
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
    args = parser.parse_args(argv)
    raw = json.loads(args.config.read_text())
    command = "python -m models.train " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    stages = raw.pop("stages", [{}])
    chosen = range(len(stages)) if args.stage is None else [args.stage - 1]
    for i in chosen:
        config = {**raw, **stages[i], "stage": i + 1}
        print(f"stage {i + 1}/{len(stages)}: {config['run_name']}", flush=True)
        train(config, args.minutes, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
