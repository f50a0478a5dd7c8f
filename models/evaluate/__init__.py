"""Held-out evaluation of the denoiser with CT image-quality physics.

    python -m models.evaluate                       # held-out series at 10/25/50 % and full dose
    python -m models.evaluate --quick               # smoke run: 2 slices, 25 % dose
    python -m models.evaluate --low DIR --full DIR  # any pair of DICOM series, slice for slice
    python -m models.evaluate --tune-gaussian       # how GAUSSIAN_SIGMA_MM was chosen
    python -m models.evaluate --figures models/card # the model card's before/after PNGs

Methods, all on the same fixed subset of slices: the low-dose input, a Gaussian filter (sigma
tuned once on the training series, then fixed), BM3D (sigma = noise std measured in the input's
uniform ROIs) and the ONNX model at strengths 0.5 and 1.0.  Untouchable pixels (outside the
field of view) pass through every method unchanged, as in the node.

Regions, found automatically in the full-dose image so that any series works:
- uniform ROIs (noise, HU bias, NPS): 32 x 32 px squares whose surroundings (4 px margin)
  stay within -200..300 HU (no air, no bone) and whose full-dose std is at most 1.5 x the
  series' noise floor (10th percentile of the local std over all such squares), so anatomy and
  edges are excluded: brain parenchyma in a head, the inserts of the phantom.  The evaluated
  slices are evenly spaced over the slices that have such ROIs.  Noise std and NPS are taken
  after removing a quadratic surface per ROI (metrics.detrend), HU bias from the plain means.
- noise texture: the NPS peak of the uniform ROIs, and of the noise alone: each low-dose
  input is simulated twice (two noise realisations), both go through the method, and the
  NPS of half their difference holds no anatomy and no full-dose grain (metrics.
  repeated_scan_nps).  The texture target is judged on that; the single-image peak, which
  anatomy pulls down as the noise falls (the full-dose image itself "shifts" it by -19 %
  on the head), is reported beside it.
- edges (MTF): round inserts with >= 300 HU contrast (the phantom's), else straight edges of
  >= 300 HU with uniform sides (bone against soft tissue in a patient), 24 x 24 px patches.
- detectability: 5 mm, 10 HU discs added to the full-dose slice before the low-dose simulation,
  centred in 24 px uniform squares (from the slices richest in them, any slice of the series);
  half the positions carry a disc in each noise realisation.  A channelized Hotelling observer
  (6 Laguerre-Gauss channels) reads 32 px ROIs; it knows the background, the quadratic surface
  fitted to the full-dose ROI (identical for both classes), and faces all the noise in the
  image, the full-dose grain included, as a reader does.  (Subtracting the full-dose ROI
  itself would hide the full-dose grain from the input's reader while charging a denoiser
  for removing it.)  d' is the figure compared (AUC saturates at 1 for an easy task).

Bounds, scored like methods: the full-dose image itself ("full dose (reference)"), and an
ideal denoiser that knew the noise-free image but, like any denoiser, not the reference's own
noise ("ideal denoiser (bound)", PSNR/SSIM/RMSE only; simulated inputs only): a target that the
ideal denoiser misses is out of reach for every method (ideal_output).

Grain size (model only, no target): the 25 % input (in pair mode the low-dose series) is
resampled by 0.7, 1 and 1.4 before the model, and the noise removed in the uniform ROIs is
reported for each: other pixel spacings and kernels give the same noise a finer or coarser
grain in pixels, and a CNN that knows only its training scanners' grain falls off fast.

The package, one job per module: ``common`` (settings, cache), ``methods``, ``regions``,
``cases``, ``observer`` (CHO), ``scoring``, ``report`` (targets, markdown), ``figures``,
``cli``; and the grain checks of issue #17, each with its own docstring: ``texture`` (the
texture grid: --texture-grid), ``real_noise`` (real low-dose, no reference: --real-noise),
``lesions`` (small inserted lesions: --lesions; their CHO d' in ``lesion_cho``).
``--split validation`` runs the grain checks on the validation series, to choose between
candidates.
"""
