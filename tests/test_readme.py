"""The README's Python example runs as written (on a smaller simulation, with fewer epochs)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_the_api_example():
    blocks = _python_blocks()
    assert len(blocks) == 1
    assert "ps.ScopeVI.setup_anndata" in blocks[0]


@pytest.mark.slow
def test_readme_api_example_runs(tmp_path, monkeypatch):
    code = _python_blocks()[0]
    small = code.replace(
        "ps.data.simulate_perturbseq()",
        "ps.data.simulate_perturbseq(n_perturbed_genes=20, n_combinations=6, n_cells_per_condition=15)",
    ).replace("max_epochs=60", "max_epochs=2, enable_progress_bar=False")
    assert small != code, "the README example changed shape; update this test's substitutions"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(small, str(README), "exec"), namespace)
    pred = namespace["pred"]
    assert pred.obs["perturbation"].astype(str).unique().tolist() == ["G005", "G005+G011"]
    assert {"log1p_norm", "log1p_norm_lower_80", "log1p_norm_upper_80"} <= set(pred.layers)
    assert (tmp_path / "scopevi_model" / "model.pt").is_file()
