"""Safety rule of a section: stop restoring when an implausible share of it reads soft or retake.

A detector that runs uncalibrated on a new instrument reads that instrument's in-focus tiles as `soft`
(its zero point is the training volume's own blur), and a mis-calibrated one can do the same; the
appliance would then silently restore, i.e. alter, most of a section. Real soft focus is a few percent
of a section. The rule (docs/operating.md): once a section has `min_tiles` judged tiles, if the share of
soft + retake among them exceeds `threshold`, restoring stops for the rest of that section and one alarm
goes to the controller. Tiles already handed to the deblur model before that still finish restoring.
Pure logic: the ingest keeps one guard per open section and asks it for every judged tile.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.messages import BlurShareAlarm, TileLabel


@dataclass
class BlurShareGuard:
    """Counts one section's labels; trips once when soft + retake exceed `threshold` after `min_tiles`."""

    threshold: float
    min_tiles: int
    n_judged: int = 0
    n_soft: int = 0
    n_retake: int = 0
    suspended: bool = False

    def observe(self, label: TileLabel, calibrated: bool) -> BlurShareAlarm | None:
        """Count one judged tile; the alarm exactly once per section, for the tile that suspends restoring.

        `empty` tiles (no tissue) are not judged for focus: they count neither way.
        """
        if label == "empty":
            return None
        self.n_judged += 1
        self.n_soft += label == "soft"
        self.n_retake += label == "retake"
        if self.suspended or self.n_judged < self.min_tiles:
            return None
        if (self.n_soft + self.n_retake) <= self.threshold * self.n_judged:
            return None
        self.suspended = True
        return BlurShareAlarm(
            n_judged=self.n_judged,
            n_soft=self.n_soft,
            n_retake=self.n_retake,
            threshold=self.threshold,
            min_tiles=self.min_tiles,
            calibrated=calibrated,
        )
