"""Export a trained checkpoint to the ONNX file the worker runs.

``python -m models.export CHECKPOINT --out node/model/ct_denoise.onnx [--noise-grain F]``
``python -m models.export --relabel node/model/ct_denoise.onnx --version V --noise-grain F``

``--noise-grain``: the noise grain (cycles per pixel, ``node.grain``) at which the model
removes the most noise, chosen on the validation series; the node resamples every series to
it.  ``--relabel`` sets version and grain in an exported file, its weights untouched.

The contract: opset 17, input ``hu`` and output ``denoised``, float32 [N, 1, H, W] in HU with
N, H and W dynamic, and metadata (name, version, training doses and data, description) so the
derived series can name the model that made it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import onnx
import torch

from models import SHIPPED_MODEL
from models.grain import WATER_PHANTOMS
from models.network import DenoiseUNet, build

OPSET = 17
MODEL_NAME = "ct-denoise-unet"
DEFAULT_VERSION = "1.0.0"


def export_model(model: DenoiseUNet, out: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` as ONNX with dynamic N, H, W and ``metadata`` in metadata_props."""
    model = model.eval().float()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, 1, 64, 64)
    tmp = out.with_suffix(".tmp.onnx")
    with torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            input_names=["hu"],
            output_names=["denoised"],
            dynamic_axes={"hu": {0: "N", 2: "H", 3: "W"}, "denoised": {0: "N", 2: "H", 3: "W"}},
            opset_version=OPSET,
            dynamo=False,
        )
    proto = onnx.load(str(tmp))
    _save_with_metadata(
        proto, {"name": MODEL_NAME, "version": DEFAULT_VERSION, **(metadata or {})}, out
    )
    tmp.unlink(missing_ok=True)
    return out


def relabel(path: Path, entries: dict[str, str]) -> Path:
    """Set metadata ``entries`` of the exported model ``path`` in place; the rest is kept."""
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props} | entries
    _save_with_metadata(proto, meta, path)
    return path


def _save_with_metadata(proto: onnx.ModelProto, meta: dict[str, str], out: Path) -> None:
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))


def load_checkpoint(path: Path) -> tuple[DenoiseUNet, dict]:
    """The network and the checkpoint's record (config, step, losses)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = build(state["config"].get("model"))
    model.load_state_dict(state["model"])
    return model, state


def metadata_from_checkpoint(state: dict, version: str | None = None) -> dict[str, str]:
    """ONNX metadata from what the training run recorded; ``version`` overrides its config's
    (a release is numbered when it is chosen, after its run)."""
    cfg = state["config"]
    doses = ",".join(f"{d:g}" for d in cfg["doses"])
    return {
        "name": MODEL_NAME,
        "version": version or cfg.get("version", DEFAULT_VERSION),
        "training_doses": doses,
        "training_data": (
            "full-dose CT series "
            + ", ".join(cfg["train_series"])
            + " (TCIA CPTAC-PDA, TCGA-OV, TCGA-THCA; CC BY); low-dose inputs simulated in the "
            "projection domain (models.simulate "
            + str(state.get("sim_version", ""))
            + ")"
            + (
                "; noise of random texture synthesised in the image domain (models.grain), "
                "with noise power spectra measured on " + ", ".join(WATER_PHANTOMS)
                if cfg.get("grain_prob")
                else ""
            )
        ),
        "description": (
            "Residual U-Net (pixel-unshuffle x2, widths "
            + "/".join(str(w) for w in cfg.get("model", {}).get("widths", (24, 48, 96)))
            + ") denoising low-dose CT; input and output float32 [N,1,H,W] in HU; "
            "predicts the noise and subtracts it; full-dose input is left almost unchanged."
        ),
        "training_command": str(state.get("command", "")),
        "training_seed": str(cfg.get("seed", "")),
        "training_wall_time_s": f"{state.get('wall_time_s', 0):.0f}",
        "training_step": str(state.get("step", "")),
        "training_machine": str(state.get("machine", "")),
        "config": json.dumps(cfg, sort_keys=True),
    } | ({"fine_tuned_from": state["base_model"]} if state.get("base_model") else {})


def main(argv: list[str] | None = None) -> int:
    """Command line: checkpoint in, ONNX out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, nargs="?")
    parser.add_argument("--out", type=Path, default=SHIPPED_MODEL)
    parser.add_argument("--version", default=None, help="release version (default: config's)")
    parser.add_argument("--noise-grain", type=float, default=None, help="cycles per pixel")
    parser.add_argument("--relabel", type=Path, default=None, help="an exported model")
    args = parser.parse_args(argv)
    grain = {} if args.noise_grain is None else {"noise_grain": f"{args.noise_grain:g}"}
    if args.relabel is not None:
        version = {} if args.version is None else {"version": args.version}
        print(f"relabelled {relabel(args.relabel, version | grain)}")
        return 0
    if args.checkpoint is None:
        parser.error("a checkpoint, or --relabel MODEL")
    model, state = load_checkpoint(args.checkpoint)
    out = export_model(model, args.out, metadata_from_checkpoint(state, args.version) | grain)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
