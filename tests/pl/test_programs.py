import matplotlib

matplotlib.use("Agg")
import numpy as np
import pandas as pd
import pytest

from perturbscope.model import PerturbationPrograms
from perturbscope.pl import perturbation_programs


def test_programs_heatmap_orders_by_active_dimensions():
    shift = pd.DataFrame({"z0": [0.1, 2.0, 0.0], "z1": [0.2, -1.0, 0.7]}, index=["A", "B", "C"])
    programs = PerturbationPrograms(shift, shift, shift.abs() >= 0.5, shift, 0.5)
    ax = perturbation_programs(programs)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["B", "C", "A"]
    np.testing.assert_allclose(ax.images[0].get_array(), shift.loc[["B", "C", "A"]].to_numpy())
    dots = ax.collections[0].get_offsets()
    assert sorted(map(tuple, np.asarray(dots))) == [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0)]
    with pytest.raises(TypeError, match="programs must be a PerturbationPrograms"):
        perturbation_programs(shift)
