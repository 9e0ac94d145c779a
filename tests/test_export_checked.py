"""Checked export loading (issue 29): checksums.sha256 per file, the safetensors header checked
against config.json's model (names, dtypes, shapes, offsets) before any weight is read, a
config.json asking for an absurd model refused before anything is built."""
import json
import time

import pytest
import torch

from echofm.engine.errors import CheckpointError
from echofm.engine.export import CHECKSUMS, load_export, read_safetensors_header, write_checksums
from echofm.engine.losses import LossConfig
from echofm.engine.masking import MaskConfig
from echofm.engine.model import EchoFM, ModelConfig


def _tiny():
    return ModelConfig(preset="echofm_tiny", img_size=32, num_frames=4, pred_t_dim=4, depth=2, decoder_depth=1)


@pytest.fixture
def export_dir(tmp_path):
    torch.manual_seed(0)
    model = EchoFM(_tiny(), MaskConfig(), LossConfig())
    out = model.save_pretrained(tmp_path / "export")
    write_checksums(out)
    return out


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def test_a_clean_export_loads_with_its_weights(export_dir):
    ref = EchoFM.from_pretrained(export_dir)
    model = load_export(export_dir)
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    lines = (export_dir / CHECKSUMS).read_text().splitlines()
    assert [ln.split("  ")[1] for ln in lines] == ["config.json", "model.safetensors"]


def test_relabelled_dtypes_are_caught_by_the_checksum_and_by_the_header_check(export_dir):
    w = export_dir / "model.safetensors"

    def relabel(h):
        for k, t in h.items():
            if k != "__metadata__" and t["dtype"] == "F32":
                t["dtype"] = "I32"

    _rewrite_header(w, relabel)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 .* does not match checksums\.sha256"):
        load_export(export_dir)
    (export_dir / CHECKSUMS).unlink()  # the tamperer removed the checksums too
    with pytest.warns(UserWarning, match="no checksums.sha256"), \
            pytest.raises(CheckpointError, match=r"tensor '\w+' is I32 \[.*\]; config.json's model has float32"):
        load_export(export_dir)


def test_swapped_offsets_of_same_shape_tensors_are_caught_by_the_checksum(export_dir):
    w = export_dir / "model.safetensors"

    def swap(h):
        a, b = "blocks.0.norm1.weight", "blocks.0.norm1.bias"
        h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]

    _rewrite_header(w, swap)
    with pytest.raises(CheckpointError, match="does not match checksums.sha256"):
        load_export(export_dir)


@pytest.mark.parametrize("case", ["length", "offsets", "overlap", "shape"])
def test_absurd_header_lengths_and_offsets_are_one_line(export_dir, case):
    w = export_dir / "model.safetensors"
    (export_dir / CHECKSUMS).unlink()
    if case == "length":
        raw = w.read_bytes()
        w.write_bytes((2**62).to_bytes(8, "little") + raw[8:])
        match = r"not a safetensors file \(header length 4611686018427387904"
    elif case == "offsets":
        _rewrite_header(w, lambda h: h["cls_token"].update(data_offsets=[0, 10**15]))
        match = r"tensor 'cls_token': offsets \[0, 1000000000000000\] do not hold"
    elif case == "overlap":
        def overlap(h):
            a, b = "blocks.0.norm1.weight", "blocks.0.norm1.bias"
            h[b]["data_offsets"] = h[a]["data_offsets"]
        _rewrite_header(w, overlap)
        match = "overlap"
    else:
        def reshape(h):
            n = h["cls_token"]["shape"]
            h["cls_token"]["shape"] = [n[2], 1, 1]
        _rewrite_header(w, reshape)
        match = r"tensor 'cls_token' is F32 \[\d+, 1, 1\]; config.json's model has float32 \[1, 1, \d+\]"
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match=match) as e:
        load_export(export_dir)
    assert "\n" not in str(e.value) and str(e.value).startswith(str(w))
    if case == "length":
        with pytest.raises(CheckpointError):
            read_safetensors_header(w)


def test_a_config_asking_for_a_51_gb_model_is_refused_before_building(export_dir):
    cfg = export_dir / "config.json"
    data = json.loads(cfg.read_text())
    data["model"].update(embed_dim=8192, num_heads=64, depth=64, decoder_embed_dim=8192, decoder_num_heads=64,
                         decoder_depth=12)
    cfg.write_text(json.dumps(data))
    write_checksums(export_dir)  # a consistent but hostile export
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"config\.json: asks for a model of ~\d+\.\d B parameters"):
        load_export(export_dir)
    assert time.perf_counter() - t0 < 2.0
    data["model"]["patch_size"] = 0
    cfg.write_text(json.dumps(data))
    write_checksums(export_dir)
    with pytest.raises(CheckpointError, match=r"config\.json: "):
        load_export(export_dir)
    data["model"]["patch_size"] = 16
    data["model"]["depth"] = -3
    cfg.write_text(json.dumps(data))
    write_checksums(export_dir)
    with pytest.raises(CheckpointError, match="must be positive integers: \\['depth'\\]"):
        load_export(export_dir)


def test_non_finite_weights_are_refused(tmp_path):
    model = EchoFM(_tiny(), MaskConfig(), LossConfig())
    with torch.no_grad():
        model.cls_token.fill_(float("nan"))
    out = model.save_pretrained(tmp_path / "e")
    write_checksums(out)
    with pytest.raises(CheckpointError, match="tensor 'cls_token' holds NaN or inf"):
        load_export(out)


def test_downstream_backbones_load_exports_checked(export_dir):
    from echofm.engine.downstream.backbone import load_backbone

    (export_dir / "model.safetensors").write_bytes((export_dir / "model.safetensors").read_bytes()[:-4] + b"\0" * 4)
    with pytest.raises(CheckpointError, match="does not match checksums.sha256"):
        load_backbone(str(export_dir), None)
