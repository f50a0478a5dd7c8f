"""Settings, shared types and the on-disk cache of the held-out evaluation."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np

from models import SHIPPED_MODEL
from models.data import (
    cache_dir,
)
from models.simulate import SIM_VERSION

DEFAULT_MODEL = SHIPPED_MODEL


#: Gaussian baseline: std in mm, chosen by ``--tune-gaussian`` (best windowed PSNR on the
#: training series at 25 % dose, 3 slices each) and then fixed for every evaluation.
GAUSSIAN_SIGMA_MM = 0.6


DOSES = (0.10, 0.25, 0.50, 1.0)


STRENGTHS = (0.5, 1.0)


ROI_PX = 32


EDGE_PX = 24


DISC_DIAMETER_MM = 5.0


DISC_CONTRAST_HU = 10.0


#: A disc goes where a square of this size (about two disc diameters) is uniform; the rest
#: of its ROI_PX ROI need not be.
CHO_UNIFORM_PX = 24


#: Simulated slices per dose and series for the observer, at most (about 1 s each).
CHO_SIMULATIONS = 100


#: Margin around a CHO ROI when a slow method (BM3D) runs on the ROI alone.
CHO_MARGIN_PX = 28


#: Display windows (width, level) by body region, as the LDCT literature reports PSNR/SSIM.
#: The phantom's inserts (70-110 HU plastic in air) lie outside a brain window: soft tissue.
WINDOWS = (
    ("phantom", (400.0, 50.0)),
    ("head", (80.0, 40.0)),
    ("brain", (80.0, 40.0)),
    ("chest", (1500.0, -600.0)),
    ("lung", (1500.0, -600.0)),
)


SOFT_TISSUE_WINDOW = (400.0, 50.0)


EVAL_SEED = 20261125


#: Seed of the second noise realisation of each low-dose input (the noise-alone NPS).
REPEAT_SEED = EVAL_SEED + 2


#: Seed and dose of the stand-in for the full-dose image's own noise (the ideal-denoiser row):
#: the simulation adds as much noise going from full to half dose as full dose carries.
STAND_IN_SEED, STAND_IN_DOSE = EVAL_SEED + 4, 0.5


Method = Callable[[np.ndarray, np.ndarray], np.ndarray]


Log = Callable[[str], None]


def _cached(key: str, make: Callable[[], np.ndarray]) -> np.ndarray:
    """An array from the evaluation cache (outside the repo), made once."""
    digest = hashlib.blake2b(key.encode(), digest_size=10).hexdigest()
    path = cache_dir() / "evaluation-inputs" / f"{digest}.npy"
    if path.exists():
        return np.load(path)
    array = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path.with_suffix(".tmp.npy"), array)
    path.with_suffix(".tmp.npy").replace(path)
    return array


#: In the cache keys of the simulated inputs: "aec" since they are simulated with the
#: tube-current modulation their photons were calibrated with (before, without it, the
#: phantom got about a ninth of its calibrated noise variance and the head 82 %).
INPUT_VERSION = f"{SIM_VERSION}-aec"
