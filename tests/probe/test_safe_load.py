import pickle

import numpy as np
import pytest
import torch

from perturbscope.probe import load_census_scvi, load_model_file


class _PrintPayload:
    def __reduce__(self):
        return (print, ("pwned",))


class _SystemPayload:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_loads_a_saved_scvi_model(census_layout):
    folder, model, _ = census_layout
    payload = load_model_file(folder / "model.pt")
    assert set(payload) == {"model_state_dict", "var_names", "attr_dict"}
    assert list(payload["var_names"]) == list(model.adata.var_names)
    state = model.module.state_dict()
    for key, value in payload["model_state_dict"].items():
        if key != "pyro_param_store":  # scvi-tools stores an empty Pyro entry
            torch.testing.assert_close(value, state[key])
    assert payload["attr_dict"]["registry_"]["setup_args"]["batch_key"] == "batch"


@pytest.mark.parametrize(
    ("payload", "name"), [(_PrintPayload, "print"), (_SystemPayload, "system")]
)
def test_refuses_a_payload_that_calls_code(tmp_path, capfd, payload, name):
    path = tmp_path / "model.pt"
    torch.save({"model_state_dict": {}, "var_names": np.array(["a"]), "attr_dict": payload()}, path)
    with pytest.raises(
        ValueError, match=rf"refusing to load .*{name}.*not on perturbscope's allow-list"
    ):
        load_model_file(path)
    assert "pwned" not in capfd.readouterr().out


def test_census_loader_refuses_a_malicious_model_pt(tmp_path, census_layout, capfd):
    _, _, query = census_layout
    with open(tmp_path / "model.pt", "wb") as handle:
        pickle.dump(_PrintPayload(), handle)  # a bare pickle, as an attacker could also ship
    with pytest.raises(ValueError, match=r"refusing to load .*print"):
        load_census_scvi(tmp_path, query, gene_id_column="ensembl_id")
    assert "pwned" not in capfd.readouterr().out


def test_plain_state_dict_loads_with_weights_only(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(3)}, path)
    torch.testing.assert_close(load_model_file(path)["w"], torch.ones(3))


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "model.pt"
    path.write_text("not a model")
    with pytest.raises(ValueError, match="model.pt"):
        load_model_file(path)
