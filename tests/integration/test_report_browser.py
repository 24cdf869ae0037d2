"""The comparison report in a real headless browser (Debian's chromium, 1280 x 900 window): no
element reaches past the viewport or overflows its own box, no sideways scrolling, every figure
loads from the page itself (nothing fetched), and a screenshot of the whole page is taken.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from avts_dist.cli import main
from tests.fixtures.mlflow_runs import log_seeded_comparison

pytestmark = pytest.mark.slow

WIDTH = 1280


def _assert_fits(facts: dict) -> None:
    assert facts["innerWidth"] == WIDTH
    assert facts["scrollWidth"] <= facts["viewport"], "the page scrolls sideways"
    assert facts["outside"] == [], facts["outside"][:5]
    assert facts["clipped"] == [], facts["clipped"][:5]
    assert facts["resources"] == [], "the page fetched something"
    for img in facts["images"]:
        assert img["complete"] and img["naturalWidth"] > 0, img
        assert img["scheme"] == "data" and 0 < img["width"] <= facts["viewport"], img


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_seeded_ablation_report_in_a_browser(chromium, seeded_report, tmp_path):
    page = seeded_report["page"]  # 3 configurations x 3 seeds, sync + synthetic evaluations
    facts = chromium.inspect(page, WIDTH, 900)
    _assert_fits(facts)
    assert len(facts["images"]) == 3  # training curves, sync vs offset, downstream bars
    shot = chromium.screenshot(page, tmp_path / "compare.png", WIDTH, facts["height"])
    assert _png_size(shot) == (WIDTH, facts["height"]) and facts["height"] > 900


def test_many_configurations_stack_and_long_values_wrap(chromium, tmp_path):
    """Five configurations (two tables' worth of columns) with long names and a 300-character
    parameter value without a space: tables stack and values wrap instead of scrolling."""
    from mlflow import MlflowClient

    arms = {f"arm_{i}_{'x' * 30}": (True, "easy_then_hard", 0.6 + 0.04 * i) for i in range(5)}
    root = tmp_path / "many"
    uri = (root / "mlruns").as_uri()
    comparison = log_seeded_comparison(uri, arms=arms, seeds=(0, 1), steps=60, evaluations=False)
    client = MlflowClient(tracking_uri=uri)
    for key, run_id in comparison.parents.items():
        client.log_param(run_id, "data.url", f"s3://bucket/{key.split('/')[0]}/" + "y" * 300)
    out = root / "out"
    assert (
        main(["compare", "--experiment", "ablation", "--tracking-uri", uri, "--out", str(out)]) == 0
    )
    facts = chromium.inspect(out / "compare.html", WIDTH, 900)
    _assert_fits(facts)
    # Configurations and pretraining: 2 tables each (4 + 1 columns); runs: 1.
    assert facts["tables"] == 5
    assert len(facts["images"]) == 1  # training curves only: no evaluation runs


def test_the_layout_check_catches_overflow_and_broken_images(chromium, tmp_path):
    """The same check fails on a page that does overflow, scroll or lose an image."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!doctype html><html><body>"
        '<div style="width:1500px">wide</div>'
        '<p style="width:200px;white-space:nowrap;overflow:hidden">' + "z" * 300 + "</p>"
        '<img alt="broken" src="data:image/png;base64,AAAA">'
        "</body></html>"
    )
    facts = chromium.inspect(bad, WIDTH, 900)
    assert facts["scrollWidth"] > facts["viewport"]
    assert any(o["el"].startswith("div") for o in facts["outside"])
    assert any(c["el"].startswith("p") for c in facts["clipped"])
    assert facts["images"][0]["naturalWidth"] == 0
    with pytest.raises(AssertionError):
        _assert_fits(facts)
