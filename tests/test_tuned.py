"""Per-GPU tuned kernel settings (pagedserve/ops/tuned.py): the committed files are valid, a
bad file is an error, and the environment wins over a file, which wins over the built-in
defaults."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("triton")

from pagedserve.ops import gemv, paged_attention as pa, pdl, tuned  # noqa: E402


def test_file_names_follow_the_device_name():
    assert tuned.file_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3.json"
    assert tuned.file_name("NVIDIA H200") == "NVIDIA_H200.json"
    assert tuned.file_name("NVIDIA A100-SXM4-80GB") == "NVIDIA_A100-SXM4-80GB.json"


@pytest.mark.parametrize("name", sorted(os.listdir(tuned.DIR)))
def test_committed_files_are_valid(name):
    data = tuned.load(os.path.join(tuned.DIR, name))
    with open(os.path.join(tuned.DIR, name)) as f:
        device = json.load(f)["device"]
    assert tuned.file_name(device) == name  # the file is found for the GPU it names
    assert data and set(data) <= set(tuned.KEYS)


@pytest.mark.parametrize("content, match", [
    ({"gemv": "2048x2048:8,512"}, "PAGEDSERVE_GEMV"),
    ({"attn_decode_config": "48,4,3"}, "PAGEDSERVE_ATTN_DECODE_CONFIG"),
    ({"pdl": "yes"}, "pdl must be true or false"),
    ({"gemv_shapes": ""}, "unknown keys"),
])
def test_bad_files_are_errors(tmp_path, content, match):
    path = tmp_path / "x.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=match):
        tuned.load(str(path))


def test_from_env_tells_unset_from_empty(monkeypatch):
    monkeypatch.delenv("PAGEDSERVE_GEMV", raising=False)
    assert tuned.from_env("PAGEDSERVE_GEMV", gemv.parse_shapes) is tuned.UNSET
    monkeypatch.setenv("PAGEDSERVE_GEMV", "")  # set but empty: no layer on the kernel, whatever a file says
    assert tuned.from_env("PAGEDSERVE_GEMV", gemv.parse_shapes) == {}
    monkeypatch.setenv("PAGEDSERVE_GEMV", "64x32:16,256,4,3")
    assert tuned.from_env("PAGEDSERVE_GEMV", gemv.parse_shapes) == {(64, 32): (16, 256, 4, 3, 1, 4)}


def test_environment_then_file_then_builtin(monkeypatch):
    cuda = torch.device("cuda", 0)
    file = {"gemv": {(64, 32): (8, 512, 4, 3, 0, 1)}, "attn_decode_config": (16, 2, 2), "pdl": True}
    monkeypatch.setattr(tuned, "_for_index", lambda index: file)
    monkeypatch.setattr(gemv, "GEMV_SHAPES", tuned.UNSET)
    assert gemv.shapes_for(cuda) == file["gemv"]
    assert gemv.shapes_for(torch.device("cpu")) == {}  # no file on CPU
    monkeypatch.setattr(gemv, "GEMV_SHAPES", {})  # PAGEDSERVE_GEMV=""
    assert gemv.shapes_for(cuda) == {}
    monkeypatch.setattr(pa, "DECODE_CONFIG", tuned.UNSET)
    assert tuned.resolve(pa.DECODE_CONFIG, "attn_decode_config", cuda, None) == (16, 2, 2)
    assert tuned.resolve(pa.K_ROWS, "attn_k_rows", cuda, pa.K_ROWS_DEFAULT) is pa.K_ROWS_DEFAULT
    monkeypatch.setattr(pa, "DECODE_CONFIG", None)  # PAGEDSERVE_ATTN_DECODE_CONFIG=""
    assert tuned.resolve(pa.DECODE_CONFIG, "attn_decode_config", cuda, None) is None
    # PDL: never on CPU, whatever is asked for.
    monkeypatch.setattr(pdl, "REQUESTED", tuned.UNSET)
    assert not pdl.pdl_enabled(torch.device("cpu"))


def test_install_all_takes_the_devices_shapes(monkeypatch):
    """With no explicit shapes, install_all routes the layers the model's device is tuned for
    (on CPU: none, unless the environment names them)."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 32))
    monkeypatch.setattr(gemv, "GEMV_SHAPES", tuned.UNSET)
    assert gemv.install_all(model) == {}
    monkeypatch.setattr(gemv, "GEMV_SHAPES", {(64, 32): (16, 256, 4, 3, 1, 4)})
    assert gemv.install_all(model) == {(64, 32): (16, 256, 4, 3, 1, 4)}
    assert hasattr(model[0], "forward_rmsnorm") and not hasattr(model[1], "forward_rmsnorm")
