"""Deblur benchmark bookkeeping: restored vs retake, the restorable range per family, issue 13's checks."""

from __future__ import annotations

import numpy as np
import pytest

from bench.deblur_eval import (
    MEMBRANE_MAX_SIGMA_PX,
    RETAKE_MAX_DEFICIT_DB,
    restorable_by_family,
    restorable_sigma,
    retake_targets,
    versus_retake,
)
from bench.membrane_eval import f1_by_tolerance
from models.blur_synth import FAMILIES

pytestmark = pytest.mark.fast


def _cell(family: str, model_below_retake: float, f1: dict | None = None) -> dict:
    """A cell: input 18, model 20 dB; retake model + `model_below_retake`; oracle 20.2 dB where a PSF exists."""
    cell: dict = {
        "input": {"psnr": 18.0},
        "model": {"psnr": 20.0},
        "retake": {"psnr": 20.0 + model_below_retake},
    }
    if family != "tilted":
        cell |= {"wiener": {"psnr": 20.2}, "rl": {"psnr": 20.1}}
    if f1 is not None:
        cell["membrane_f1"] = f1
    return cell


def _f1(retake: float, blurred: float, model: float) -> dict:
    return {
        "retake": {"vs_in_focus_tol0": retake, "vs_in_focus": 0.99},
        "input": {"vs_in_focus_tol0": blurred, "vs_in_focus": 0.95},
        "model": {"vs_in_focus_tol0": model, "vs_in_focus": 0.97},
    }


def test_versus_retake_is_psnr_minus_the_retake_per_family_and_strength() -> None:
    table = {"gaussian@1": _cell("gaussian", 2.5), "tilted@1": _cell("tilted", 1.0)}
    rows = versus_retake(table)
    assert rows["gaussian"]["1"] == pytest.approx({"input": -4.5, "model": -2.5, "oracle": -2.3})
    assert rows["tilted"]["1"] == pytest.approx({"input": -3.0, "model": -1.0})  # no single PSF, no oracle


def test_retake_range_per_family_is_the_largest_contiguous_passing_strength() -> None:
    deficits = {  # retake PSNR minus model PSNR per strength
        "gaussian": (0.2, 0.4, 0.9, 0.1),  # passes 1, 1.5; fails 2 -> 1.5 (3 passing again does not count)
        "disk": (0.6, 0.1, 0.1, 0.1),  # fails at the smallest -> None
        "astigmatic": (0.0, 0.0, 0.0, 0.0),  # passes everywhere -> 3
        "tilted": (RETAKE_MAX_DEFICIT_DB, 2.0, 2.0, 2.0),  # exactly at the limit passes -> 1
    }
    strengths = (1.0, 1.5, 2.0, 3.0)
    table = {
        f"{family}@{sigma:g}": _cell(family, d)
        for family, ds in deficits.items()
        for sigma, d in zip(strengths, ds, strict=True)
    }
    assert set(deficits) == set(FAMILIES)
    ranges = restorable_by_family(table)["retake_equivalent"]
    assert ranges == {"gaussian": 1.5, "disk": None, "astigmatic": 3.0, "tilted": 1.0, "all": None}
    assert restorable_sigma(table, "retake_equivalent", ("gaussian", "astigmatic")) == 1.5
    # The oracle-based reading on the same table: gain 2 dB, 0.2 dB below the oracle everywhere.
    assert restorable_by_family(table)["model_best"]["all"] == 3.0


def test_issue_targets_report_the_worst_cell_and_whether_every_cell_meets_it() -> None:
    table = {
        "gaussian@1": _cell("gaussian", -0.1, _f1(0.97, 0.94, 0.975)),  # model above the retake
        "disk@1.5": _cell("disk", 2.0, _f1(0.97, 0.90, 0.95)),  # 2 dB, 0.02 F1 below the retake
        "disk@3": _cell("disk", 4.0, _f1(0.97, 0.80, 0.80)),  # no F1 gain over the input
        "disk@4": _cell("disk", 5.0),  # beyond the target range and not scored for F1
    }
    targets = retake_targets(table)
    psnr = targets["psnr_model_minus_retake_sigma_le_1_5"]
    assert (psnr["met"], psnr["worst"], psnr["worst_cell"], psnr["cells"]) == (False, -2.0, "disk@1.5", 2)
    f1_retake = targets["f1_vs_in_focus_tol0_model_minus_retake_sigma_le_1_5"]
    assert (f1_retake["met"], f1_retake["worst_cell"]) == (False, "disk@1.5")
    assert f1_retake["worst"] == pytest.approx(-0.02)
    f1_input = targets["f1_vs_in_focus_tol0_model_minus_input"]
    assert (f1_input["met"], f1_input["worst"], f1_input["cells"]) == (False, 0.0, 3)  # equal is not above
    assert targets["f1_vs_in_focus_model_minus_input"]["met"] is True
    assert MEMBRANE_MAX_SIGMA_PX == 3.0  # the appliance's restorable range, where F1 is scored


def test_f1_by_tolerance_is_plain_pixel_f1_at_0_and_forgiving_at_2_px() -> None:
    reference = np.zeros((32, 32), bool)
    reference[:, 10] = True
    shifted = np.roll(reference, 1, axis=1)  # the membrane one pixel off
    assert f1_by_tolerance(reference, reference) == {"": 1.0, "_tol0": 1.0}
    assert f1_by_tolerance(shifted, reference) == {"": 1.0, "_tol0": 0.0}
