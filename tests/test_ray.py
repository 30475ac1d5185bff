"""`clipforge embed --ray` on a local two-CPU Ray instance bound to 127.0.0.1 equals the single-process output.

Ray is a CI requirement here: if it is not importable this test fails rather than skips."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import save_tiny_model
from test_embed import read_folder

from clipforge.cli import main
from clipforge.data.synthetic import write_shapes
from clipforge.encoder import Encoder
from clipforge.index.embed import embed_to_folder


@pytest.mark.slow
def test_ray_output_equals_single_process(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only; read when ray is imported
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    import ray  # a missing install is a failure, not a skip

    model = save_tiny_model(tmp_path / "m")
    manifest = write_shapes(tmp_path / "shapes", 9, 40, 0)
    (tmp_path / "shapes" / "images" / "00004.png").write_bytes(b"broken")
    single = embed_to_folder(
        manifest,
        Encoder.load(model),
        tmp_path / "single",
        part_size=4,
        batch_size=3,
        workers=1,
        dtype="float32",
    )
    import clipforge.index.embed_ray as er

    real_start = er._start_ray
    monkeypatch.setattr(er, "_start_ray", lambda address, num_cpus: real_start(address, 2))
    args = [
        "embed",
        str(manifest),
        "--model",
        str(model),
        "--out",
        str(tmp_path / "ray"),
        "--ray",
        "--part-size",
        "4",
        "--batch-size",
        "3",
        "--dtype",
        "float32",
        "--json",
    ]
    assert main(args) == 0, capsys.readouterr().err
    assert not ray.is_initialized()  # the local instance it started is shut down
    a, b = read_folder(tmp_path / "ray"), read_folder(tmp_path / "single")
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    np.testing.assert_allclose(a[1], b[1], atol=1e-6)
    assert a[2] == b[2] and len(a[2]) == 8
    names = sorted(os.listdir(tmp_path / "ray" / "img_emb"))
    assert (
        names == sorted(os.listdir(tmp_path / "single" / "img_emb")) == [f"img_emb_{i}.npy" for i in range(3)]
    )
    assert single.skipped[0][0].endswith("00004.png")
