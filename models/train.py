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
from pathlib import Path

import numpy as np

# OpenMP threads that spin while waiting are 10x slower on a shared, oversubscribed CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from models.data import SHARED_CT, TRAIN_SERIES, cache_dir, load_series
from models.network import build, parameter_count
from models.simulate import SIM_VERSION, simulate_series
from node.pixels import FILL_HU

DEFAULT_CONFIG = Path(__file__).with_name("train_config.json")
#: Synthetic inserts (PatchSampler._inserts): the ring is air; the edge has a partial-volume
#: blur of this sigma.
INSERT_RING_HU = -1000.0
INSERT_EDGE_SIGMA_PX = 0.7


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


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage's 1-D Gaussian (radius ``int(truncate * sigma + 0.5)``), normalised."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).to(torch.float32)


def gaussian_blur(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of [N, H, W] with edge replication (scipy's mode="nearest")."""
    r = kernel.numel() // 2
    x = images[:, None]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x[:, 0]


class PatchSampler:
    """Random training patches (input, target, loss mask) with dose, scale, flips and turns.

    The series are stacked once on the training device and each batch is one gather there,
    so a GPU never waits for the CPU.  The random numbers come from a seeded CPU generator:
    a seed draws the same patches on every machine.
    """

    def __init__(
        self, data: list[dict], config: dict, device: torch.device | str = "cpu", seed: int = 0
    ) -> None:
        if len({s["full"].shape[1:] for s in data}) != 1:
            raise ValueError("the training series must share one slice size")
        self.size, self.batch = int(config["patch"]), int(config["batch"])
        self.device = torch.device(device)
        self.doses = torch.tensor([float(d) for d in config["doses"]], device=self.device)
        weights = torch.tensor(config["dose_weights"], dtype=torch.float64)
        self.dose_weights = weights / weights.sum()
        self.keep_extra = float(config.get("keep_extra_noise") or 0.0)
        self.scale_prob = float(config.get("scale_prob", 0.0))
        self.scale_range = tuple(float(v) for v in config.get("scale_range", (1.0, 1.0)))
        self.kernel = gaussian_kernel(float(config.get("scale_sigma", 1.0))).to(self.device)
        self.insert_prob = float(config.get("insert_prob", 0.0))
        self.insert_radius = tuple(float(v) for v in config.get("insert_radius_px", (6, 30)))
        self.insert_ring = tuple(float(v) for v in config.get("insert_ring_px", (0, 30)))
        self.insert_hu = tuple(float(v) for v in config.get("insert_hu", (-100, 250)))
        self.edge_kernel = gaussian_kernel(INSERT_EDGE_SIGMA_PX).to(self.device)
        self.zoom_prob = float(config.get("zoom_prob", 0.0))
        self.zoom_range = tuple(float(v) for v in config.get("zoom_range", (1.0, 1.0)))
        # the source window of a zoomed patch: wide enough for the smallest zoom, and centred
        # on the patch's own pixels (same parity as the patch)
        window = math.ceil(self.size / min(self.zoom_range[0], 1.0))
        self.window = window + (window - self.size) % 2
        self.generator = torch.Generator().manual_seed(seed)
        counts = [s["full"].shape[0] for s in data]
        self.counts = torch.tensor(counts)
        self.offsets = torch.tensor(np.cumsum([0, *counts[:-1]]))
        self.full = self._stack([s["full"] for s in data])
        self.keep = self._stack([s["keep"] for s in data])
        self.low = torch.stack(
            [self._stack([s["low"][float(d)] for s in data]) for d in config["doses"]]
        )
        self._span = torch.arange(self.size, device=self.device)

    def _stack(self, arrays: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(arrays)).to(self.device)

    def _crop(
        self,
        stack: torch.Tensor,
        lead: tuple[torch.Tensor, ...],
        ys: torch.Tensor,
        xs: torch.Tensor,
        size: int | None = None,
    ) -> torch.Tensor:
        """``stack[lead..., y:y+S, x:x+S]`` for every patch at once (one gather); S is the
        patch size unless given."""
        span = self._span if size is None else torch.arange(size, device=self.device)
        rows = (ys.to(self.device)[:, None] + span)[:, :, None]
        cols = (xs.to(self.device)[:, None] + span)[:, None, :]
        return stack[tuple(i.to(self.device)[:, None, None] for i in lead) + (rows, cols)]

    def _zoom(
        self,
        chosen: torch.Tensor,
        zoom: torch.Tensor,
        places: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        patches: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Target, input and mask with the chosen patches resampled by ``zoom`` (output
        pixels per source pixel) about their centres, bilinear, input and target alike.

        The network's noise removal depends on the size of the grain in pixels, which pixel
        spacing and kernel set: 2.2.0 removed 54 % of the held-out head's noise at 25 % dose
        but 25 % once the head was resampled by 1.3 or 0.6, and the phantom (0.45 mm pixels,
        coarse grain) got most (44 %) at 0.7.  Zoomed patches teach it other grain sizes;
        the shipped model does not use them (they made it alter thin air channels on
        full-dose input: models/TRAINING_LOG.md).
        """
        index, dose, ys, xs = places
        target, inp, mask = (a.clone() for a in patches)
        pick = chosen.nonzero().squeeze(1)
        h, w = self.full.shape[1:]
        q, margin = self.window, (self.window - self.size) // 2
        wy = (ys[pick] - margin).clamp(0, h - q)
        wx = (xs[pick] - margin).clamp(0, w - q)
        sources = torch.stack(
            [
                self._crop(self.full, (index[pick],), wy, wx, q),
                self._crop(self.low, (dose[pick], index[pick]), wy, wx, q),
                self._crop(self.keep, (index[pick],), wy, wx, q).to(target.dtype),
            ],
            dim=1,
        )
        theta = torch.zeros(len(pick), 2, 3, device=self.device)
        scale = self.size / (zoom[pick].to(self.device) * q)
        theta[:, 0, 0], theta[:, 1, 1] = scale, scale
        grid = F.affine_grid(theta, [len(pick), 3, self.size, self.size], align_corners=False)
        out = F.grid_sample(sources, grid, mode="bilinear", align_corners=False)
        target[pick], inp[pick], mask[pick] = out[:, 0], out[:, 1], out[:, 2] < 0.5
        return target, inp, mask

    def _places(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Slice and corner of each patch; mostly-air patches are kept only 5 % of the time."""
        g, n = self.generator, 2 * self.batch
        h, w = self.full.shape[1:]
        found: list[torch.Tensor] = []
        while sum(len(f) for f in found) < self.batch:
            series = torch.randint(len(self.counts), (n,), generator=g)
            index = self.offsets[series] + (torch.rand(n, generator=g) * self.counts[series]).long()
            ys = torch.randint(h - self.size + 1, (n,), generator=g)
            xs = torch.randint(w - self.size + 1, (n,), generator=g)
            lucky = torch.rand(n, generator=g) < 0.05
            body = (self._crop(self.full, (index,), ys, xs) > -900).float().mean(dim=(1, 2))
            accept = (body.cpu() >= 0.2) | lucky
            found.append(torch.stack([index, ys, xs])[:, accept])
        index, ys, xs = torch.cat(found, dim=1)[:, : self.batch]
        return index, ys, xs

    def _uniform(self, n: int, bounds: tuple[float, float]) -> torch.Tensor:
        lo, hi = bounds
        return (lo + (hi - lo) * torch.rand(n, generator=self.generator)).to(self.device)

    def _log_uniform(self, n: int, bounds: tuple[float, float]) -> torch.Tensor:
        """Factors drawn log-uniformly in ``bounds`` (on the CPU, like every draw)."""
        lo, hi = np.log(bounds[0]), np.log(bounds[1])
        return torch.exp(lo + (hi - lo) * torch.rand(n, generator=self.generator)).float()

    def _inserts(
        self, inp: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, d: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Input and target with a uniform disc, most in a ring of air, in some patches.

        Phantom inserts and small structures surrounded by air are missing from patient
        series, and a network trained on patients alone leaves them noisy (a 100 HU disc of
        20 px radius in an air ring: 0 % noise removed; the same disc in brain: 24 %).  Inside
        the insert the input carries the patch's own simulated extra noise ``e`` where it is,
        and both input and target carry full-dose-like noise: ``e`` turned by 180 degrees
        (another place, so independent of it) and scaled to the full-dose variance, which is
        d / (1 - d) times the extra variance at dose ``d`` (per patch).  The edge has a
        partial-volume blur.
        """
        b, p = target.shape[0], self.size
        chosen = (torch.rand(b, generator=self.generator) < self.insert_prob).to(self.device)
        cy, cx = self._uniform(b, (0, p - 1)), self._uniform(b, (0, p - 1))
        radius = self._uniform(b, self.insert_radius)
        outer = radius + self._uniform(b, self.insert_ring)
        inside_hu = self._uniform(b, self.insert_hu)
        k = (slice(None), None, None)
        yy = self._span.to(target.dtype)[None, :, None]
        xx = self._span.to(target.dtype)[None, None, :]
        r = torch.sqrt((yy - cy[k]) ** 2 + (xx - cx[k]) ** 2)
        content = torch.where(r < radius[k], inside_hu[k], torch.full_like(r, INSERT_RING_HU))
        content = gaussian_blur(content, self.edge_kernel)
        weight = gaussian_blur((r < outer[k]).to(target.dtype), self.edge_kernel)
        weight = torch.where(chosen[k] & mask, weight, torch.zeros_like(weight))
        extra = (inp - target) / (1.0 - self.keep_extra)
        full_like = torch.sqrt(torch.where(d < 1, d / (1 - d).clamp(min=1e-6), 0.0))
        native = full_like[k] * extra.flip(-1, -2)
        inp = inp + weight * (content + native + extra - inp)
        target = target + weight * (content + native + self.keep_extra * extra - target)
        return inp, target

    def draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One batch: input and target [B, 1, P, P] in HU, loss mask (body pixels) as float."""
        g, b = self.generator, self.batch
        index, ys, xs = self._places()
        dose = torch.multinomial(self.dose_weights, b, replacement=True, generator=g)
        scaled = torch.rand(b, generator=g) < self.scale_prob
        factor = self._log_uniform(b, self.scale_range)
        turns = torch.randint(4, (b,), generator=g)
        flips = torch.randint(2, (b,), generator=g).bool()

        target = self._crop(self.full, (index,), ys, xs)
        inp = self._crop(self.low, (dose, index), ys, xs)
        mask = ~self._crop(self.keep, (index,), ys, xs)
        if self.zoom_prob:
            zoomed = torch.rand(b, generator=g) < self.zoom_prob
            zoom = self._log_uniform(b, self.zoom_range)
            if zoomed.any():
                target, inp, mask = self._zoom(
                    zoomed, zoom, (index, dose, ys, xs), (target, inp, mask)
                )
        dose_value = self.doses[dose.to(self.device)]
        if self.keep_extra:
            # Aim at a full-dose look, not below it: the best estimate of the full-dose image
            # also removes most of its grain (a plastic texture); keeping a fraction of the
            # extra noise in the target lands the output near full-dose noise instead.
            low_dose = (dose_value < 1)[:, None, None]
            target = torch.where(low_dose, target + self.keep_extra * (inp - target), target)
        if scaled.any():
            # Quieter scanners: shrink the detail (noise and fine contrast) around a smooth
            # local mean, so the model sees noise levels below those of the training series.
            k = factor.to(self.device)[:, None, None]
            chosen = scaled.to(self.device)[:, None, None]
            smooth = gaussian_blur(target, self.kernel)
            fill = torch.tensor(FILL_HU, device=self.device)
            inp = torch.where(chosen, torch.where(mask, smooth + k * (inp - smooth), fill), inp)
            target = torch.where(
                chosen, torch.where(mask, smooth + k * (target - smooth), fill), target
            )
        if self.insert_prob:
            inp, target = self._inserts(inp, target, mask, dose_value)
        out = []
        for a in (inp, target, mask.float()):
            a = a.clone()
            for t in range(1, 4):
                turn = (turns == t).to(self.device)
                a[turn] = torch.rot90(a[turn], t, dims=(1, 2))
            flip = flips.to(self.device)
            a[flip] = a[flip].flip(-1)
            out.append(a[:, None])
        return out[0], out[1], out[2]


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
    for dose in history["val"][0]["mae"] if history["val"] else []:
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
    """Start from a released ONNX model (a path ending in .onnx) or an earlier run's best
    checkpoint (a run name), so a hospital can fine-tune the shipped model on its own series.
    Returns what was loaded, for the checkpoint and the exported model's metadata."""
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


def train(config: dict, minutes: float | None, command: str) -> Path:
    """Run one training; return the path of the best checkpoint."""
    torch.set_num_threads(int(config["threads"]))
    torch.manual_seed(int(config["seed"]))
    device = training_device()
    run_dir = cache_dir() / "checkpoints" / config["run_name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_data, val_data = load_pairs(config)
    prep_s = time.perf_counter() - t0
    print(f"data ready in {prep_s:.0f} s", flush=True)

    sampler = PatchSampler(train_data, config, device, seed=int(config["seed"]))
    model = build(config.get("model"))
    base = load_initial_weights(model, config["init_from"]) if config.get("init_from") else ""
    if base:
        print(f"initialised from {base}", flush=True)
    model.to(device)
    print(f"model: {parameter_count(model)} parameters on {describe(device)}", flush=True)
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
    running: torch.Tensor | float = 0.0
    count = 0
    step = 0
    lr = 0.0
    for step in range(steps):
        lr = lr_at(step, time.perf_counter() - start)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y, m = sampler.draw()
        pred = model(x)
        loss = (F.l1_loss(pred, y, reduction="none") * m).sum() / m.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += loss.detach()  # a tensor: no GPU sync per step
        count += 1
        elapsed = time.perf_counter() - start
        last = step + 1 == steps or elapsed > budget_s
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
                f"lr {lr:.2e} {elapsed / (step + 1):.3f} s/step "
                f"elapsed {elapsed / 60:.1f} min",
                flush=True,
            )
            running, count = 0.0, 0
        if (step + 1) % int(config["val_every"]) == 0 or last:
            mae = validate(model, val_data, config, device)
            score = float(np.mean(list(mae.values())))
            history["val"].append({"step": step + 1, "mae": mae, "score": score})
            print(f"  val MAE (HU) {json.dumps(mae)} mean {score:.3f}", flush=True)
            record = {
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "config": config,
                "step": step + 1,
                "val": mae,
                "command": command,
                "sim_version": SIM_VERSION,
                "wall_time_s": time.perf_counter() - t0,
                "train_time_s": elapsed,
                "parameters": parameter_count(model),
                "base_model": base,
                "machine": f"{platform.node()} {describe(device)}, torch {torch.__version__}",
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
    parser.add_argument(
        "--init-from",
        default=None,
        help="start the first stage run from this ONNX model or run name instead of its "
        "config's init_from (later stages start from the stage before, as configured)",
    )
    args = parser.parse_args(argv)
    raw = json.loads(args.config.read_text())
    command = "python -m models.train " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    for config in stage_configs(raw, args.stage, args.init_from):
        print(
            f"stage {config['stage']}/{len(raw.get('stages', [{}]))}: {config['run_name']}",
            flush=True,
        )
        train(config, args.minutes, command)
    return 0


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
