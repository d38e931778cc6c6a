"""examples/hvs_in_your_loop.py: HVS in a plain PyTorch loop stays short and really selects."""
import math
import re

import pytest

from tests.helpers import ROOT, cli

EXAMPLE = ROOT / "examples" / "hvs_in_your_loop.py"


def test_example_is_short():
    assert len(EXAMPLE.read_text().splitlines()) < 60


@pytest.mark.slow
def test_example_trains_on_selected_views():
    r = cli("-m", "examples.hvs_in_your_loop", env={"OMP_NUM_THREADS": "1"}, timeout=300)  # 2 shared cores
    assert r.returncode == 0, r.stderr
    rows = re.findall(r"^epoch (\d+) step (\d+): loss (\S+), pair other than \(0, 1\) so far: (\d+)%$",
                      r.stdout, re.M)
    assert len(rows) == 12  # 2 epochs of 96 images in batches of 16
    losses = [float(loss) for _, _, loss, _ in rows]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]  # it trains
    share = int(rows[-1][3])
    # hard selection from 6 pairs at random initialisation: (0, 1) is the hardest for about 1 image in 6,
    # never for all of them; with the selector switched off the share would be 0
    assert 50 <= share < 100
