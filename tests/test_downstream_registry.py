"""The downstream dataset registry and the readers: the shipped registry, per-dataset errors that
name the dataset and field, and nnU-Net raw / image-folder datasets with broken parts."""

from __future__ import annotations

import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from openmind_bench.downstream.readers import DatasetError, case_table, read_dataset, read_datasets
from openmind_bench.registry import RegistryError, load_registry
from openmind_bench.qc import Rejections


def test_shipped_registry_has_the_benchmark_datasets(repo):
    reg = load_registry(repo / "config" / "downstream_datasets.yaml")
    assert reg.errors == {} and len(reg.datasets) == 15
    assert len(reg.names(task="seg")) == 12 and len(reg.names(task="cls")) == 3
    assert len(reg.names(task="seg", role="dev")) == 4 and len(reg.names(task="seg", role="test")) == 8
    assert len(reg.names(task="cls", role="test")) == 3
    # OpenMind's means fix 9 in-domain and 3 out-of-domain segmentation sets
    assert len(reg.names(task="seg", domain="id")) == 9 and len(reg.names(task="seg", domain="ood")) == 3
    assert {"ATL", "COS", "ACD", "ABI"} <= set(reg.datasets)
    for spec in reg.datasets.values():
        assert spec.source.is_relative_to(reg.root)
        if spec.task == "seg":
            assert spec.nsd_tolerance_mm > 0 and spec.labels.get("background") == 0
    # every field the papers do not settle says so
    assert all("identity" in reg.datasets[n].uncertain for n in ("OAS", "ADH", "BTM"))
    assert reg.datasets["BTM"].zero_shot_from == "BRM"


def test_demo_registry_and_root_override(repo, tmp_path):
    reg = load_registry(repo / "config" / "downstream_demo.yaml", root=tmp_path)
    assert reg.errors == {} and reg.names() == ["DemoLesionT1", "DemoLesionT1FLAIR", "DemoPatientCls"]
    assert reg.datasets["DemoLesionT1FLAIR"].source == tmp_path / "Dataset902_DemoLesionT1FLAIR"
    assert reg.datasets["DemoLesionT1FLAIR"].channels == 2


def write_registry(path, datasets, root=None):
    path.write_text(yaml.safe_dump({"root": str(root or path.parent), "datasets": datasets}))
    return path


GOOD = {"task": "seg", "role": "test", "domain": "id", "source": "Seg", "modalities": ["T1w"],
        "labels": {"background": 0, "lesion": 1}, "nsd_tolerance_mm": 1.0}


@pytest.mark.parametrize("change, field, message", [
    ({"task": "segmentation"}, "task", "not one of"),
    ({"nsd_tolerance_mm": None}, "nsd_tolerance_mm", "needs a tolerance"),
    ({"labels": {"lesion": 1}}, "labels", "background"),
    ({"modalities": []}, "modalities", "non-empty list"),
    ({"nsd_tolerence_mm": 1.0}, "nsd_tolerence_mm", "unknown field"),
    ({"zero_shot_from": "NOPE"}, "zero_shot_from", "not a usable"),
    ({"subject_pattern": "(unclosed"}, "subject_pattern", "regular expression"),
    ({"uncertain": {"colour": "?"}}, "uncertain", "not a field"),
    ({"task": "cls", "labels": {"a": 0, "b": 2}, "nsd_tolerance_mm": None}, "labels", "0..1"),
])
def test_a_bad_entry_names_dataset_and_field_and_the_others_load(tmp_path, change, field, message):
    bad = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    reg = load_registry(write_registry(tmp_path / "r.yaml", {"GOOD": GOOD, "BAD": bad}))
    assert list(reg.datasets) == ["GOOD"]
    assert f"datasets.BAD.{field}" in reg.errors["BAD"] and message in reg.errors["BAD"]
    with pytest.raises(RegistryError, match=f"datasets.BAD.{field}"):
        reg.get("BAD")
    with pytest.raises(RegistryError, match="not in the registry"):
        reg.get("OTHER")


def test_unusable_registry_files_raise(tmp_path):
    with pytest.raises(RegistryError, match="does not exist"):
        load_registry(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("datasets: [unclosed\n")
    with pytest.raises(RegistryError, match="not valid YAML"):
        load_registry(tmp_path / "bad.yaml")
    (tmp_path / "empty.yaml").write_text("root: x\n")
    with pytest.raises(RegistryError, match="non-empty mapping 'datasets'"):
        load_registry(tmp_path / "empty.yaml")


# ------------------------------------------------------------------------------------- readers


def save(data, path, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0]) if affine is None else affine), str(path))


def make_seg_dataset(root, name="Seg", cases=("a_1", "a_2", "b_1", "c_1"), channels=2):
    folder = root / name
    rng = np.random.default_rng(0)
    for i, case in enumerate(cases):
        label = np.zeros((8, 8, 6), np.uint8)
        label[2:4 + i, 2:5, 1:3] = 1
        for ch in range(channels):
            save(rng.random((8, 8, 6)).astype(np.float32), folder / "imagesTr" / f"{case}_{ch:04d}.nii.gz")
        save(label, folder / "labelsTr" / f"{case}.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {str(c): m for c, m in enumerate(["T1w", "FLAIR"][:channels])},
        "labels": {"background": 0, "lesion": 1}, "numTraining": len(cases), "file_ending": ".nii.gz"}))
    return folder


def make_cls_dataset(root, name="Cls"):
    folder = root / name
    rng = np.random.default_rng(1)
    rows = ["case,label,subject,site"]
    for i, (case, label) in enumerate([("x1", "patient"), ("x2", "control"), ("y1", "1"), ("z1", "control")]):
        save(rng.random((6, 6, 6)).astype(np.float32), folder / "imagesTr" / f"{case}_0000.nii.gz")
        rows.append(f"{case},{label},{case[0]},site{i % 2}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


def registry_for(tmp_path, **datasets):
    return load_registry(write_registry(tmp_path / "registry.yaml", datasets, root=tmp_path / "data"))


SEG = {**GOOD, "modalities": ["T1w", "FLAIR"], "subject_pattern": r"^(?P<subject>[a-z])_"}
CLS = {"task": "cls", "role": "test", "domain": "id", "source": "Cls", "modalities": ["T1w"],
       "labels": {"control": 0, "patient": 1}}


def test_read_segmentation_and_classification(tmp_path):
    make_seg_dataset(tmp_path / "data")
    make_cls_dataset(tmp_path / "data")
    reg = registry_for(tmp_path, Seg=SEG, Cls=CLS)
    data, errors = read_datasets(reg)
    assert errors == {}
    seg = data["Seg"]
    assert [c.case_id for c in seg.cases] == ["a_1", "a_2", "b_1", "c_1"]
    assert [c.subject for c in seg.cases] == ["a", "a", "b", "c"]
    assert seg.case("a_2").images[1].name == "a_2_0001.nii.gz" and seg.rejected == []
    table = case_table(seg)
    assert table["present:lesion"].tolist() == [1, 1, 1, 1]
    assert table["volume_ml:lesion"].tolist() == pytest.approx([12 * 2e-3, 18 * 2e-3, 24 * 2e-3, 30 * 2e-3])
    cls = data["Cls"]
    assert [(c.case_id, c.target, c.subject, c.site) for c in cls.cases] == [
        ("x1", 1, "x", "site0"), ("x2", 0, "x", "site1"), ("y1", 1, "y", "site0"), ("z1", 0, "z", "site1")]
    assert case_table(cls).label.tolist() == [1, 0, 1, 0]


def test_broken_cases_are_rejected_and_skipped(tmp_path):
    folder = make_seg_dataset(tmp_path / "data")
    (folder / "imagesTr" / "a_2_0001.nii.gz").unlink()  # a channel missing
    save(np.zeros((8, 8, 5), np.uint8), folder / "labelsTr" / "b_1.nii.gz")  # label on another grid
    (folder / "imagesTr" / "c_1_0000.nii.gz").write_bytes(b"not a nifti")  # unreadable
    save(np.zeros((8, 8, 6), np.float32), folder / "imagesTr" / "d_1_0000.nii.gz")  # image without a label
    reg = registry_for(tmp_path, Seg=SEG)
    data = read_dataset(reg.get("Seg"))
    assert [c.case_id for c in data.cases] == ["a_1"]
    reasons = dict(data.rejected)
    assert "channel(s) [1] missing" in reasons[str(folder / "labelsTr" / "a_2.nii.gz")]
    assert "not on the grid" in reasons[str(folder / "labelsTr" / "b_1.nii.gz")]
    assert "unreadable header" in reasons[str(folder / "labelsTr" / "c_1.nii.gz")]
    assert "without a label" in reasons[str(folder / "imagesTr" / "d_1_0000.nii.gz")]
    record = Rejections("downstream")
    data.record_rejections(record)
    assert len(record) == 4 and set(record.frame().dataset) == {"Seg"}


@pytest.mark.parametrize("breakage, message", [
    (lambda f: shutil.rmtree(f), "source folder does not exist"),
    (lambda f: (f / "dataset.json").write_text("{broken"), "not valid JSON"),
    (lambda f: (f / "dataset.json").write_text(json.dumps({"labels": {}})), "lacks"),
    (lambda f: (f / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1w"}, "labels": {"background": 0, "lesion": 1}, "numTraining": 4,
        "file_ending": ".nii.gz"})), "1 channel"),
    (lambda f: (f / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1w", "1": "FLAIR"}, "labels": {"background": 0, "lesion": 2}, "numTraining": 4,
        "file_ending": ".nii.gz"})), "do not match the registry"),
    (lambda f: shutil.rmtree(f / "labelsTr"), "labelsTr/ is missing"),
    (lambda f: [p.unlink() for p in (f / "imagesTr").glob("*_0001.nii.gz")], "no usable case"),
])
def test_a_broken_dataset_is_reported_by_name_and_the_others_go_on(tmp_path, breakage, message):
    breakage(make_seg_dataset(tmp_path / "data"))
    make_cls_dataset(tmp_path / "data")
    reg = registry_for(tmp_path, Seg=SEG, Cls=CLS)
    data, errors = read_datasets(reg)
    assert list(data) == ["Cls"] and list(errors) == ["Seg"]
    assert errors["Seg"].startswith("dataset Seg (") and message in errors["Seg"]


def test_classification_table_problems(tmp_path):
    folder = make_cls_dataset(tmp_path / "data")
    text = (folder / "labels.csv").read_text().replace("y1,1,", "y1,maybe,")
    (folder / "labels.csv").write_text(text)
    (folder / "imagesTr" / "z1_0000.nii.gz").unlink()
    reg = registry_for(tmp_path, Cls=CLS)
    data = read_dataset(reg.get("Cls"))
    assert [c.case_id for c in data.cases] == ["x1", "x2"]
    assert dict(data.rejected) == {"y1": "label 'maybe' is not one of ['control', 'patient'] (or their indices)",
                                   "z1": "channel(s) [0] missing in imagesTr/"}
    (folder / "labels.csv").write_text(text + "x1,control,x,site0\n")
    with pytest.raises(DatasetError, match="Cls.*lists case\\(s\\) twice"):
        read_dataset(reg.get("Cls"))
    (folder / "labels.csv").write_text("id,diagnosis\nx1,patient\n")
    with pytest.raises(DatasetError, match="needs columns case,label"):
        read_dataset(reg.get("Cls"))


def test_metadata_table_gives_subjects_and_sites(tmp_path):
    folder = make_seg_dataset(tmp_path / "data")
    (folder / "meta.csv").write_text("case,subject,site\na_1,p1,s1\na_2,p1,s1\nb_1,p2,s2\n")
    reg = registry_for(tmp_path, Seg={**GOOD, "modalities": ["T1w", "FLAIR"], "metadata": "meta.csv"})
    data = read_dataset(reg.get("Seg"))
    assert [(c.case_id, c.subject, c.site) for c in data.cases] == [("a_1", "p1", "s1"), ("a_2", "p1", "s1"),
                                                                    ("b_1", "p2", "s2")]
    assert "not in the metadata table" in dict(data.rejected)[str(folder / "labelsTr" / "c_1.nii.gz")]


def test_check_command_reports_every_dataset(tmp_path, capsys):
    import argparse

    from openmind_bench.downstream import data_cli as cli

    make_seg_dataset(tmp_path / "data")
    write_registry(tmp_path / "registry.yaml", {"Seg": SEG, "Cls": CLS}, root=tmp_path / "data")
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["downstream-check", "--registry", str(tmp_path / "registry.yaml")])
    assert args.func(args) == 1  # Cls has no folder: reported, Seg still checked
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Seg\tok\t4 cases\t0 rejected") and out[1].startswith("Cls\terror\tdataset Cls (")
    args = parser.parse_args(["downstream-splits", "--registry", str(tmp_path / "registry.yaml"), "--datasets", "Seg",
                              "--out", str(tmp_path / "splits"), "--test-fraction", "0.25"])
    assert args.func(args) == 0 and (tmp_path / "splits" / "Seg.json").is_file()


def test_label_images_with_undeclared_values_are_rejected_by_the_split_rule(tmp_path):
    from openmind_bench.downstream.readers import checked_case_table, declared_label_values, restricted_to
    from openmind_bench.downstream.splits import SplitSettings, all_cases, split_dataset

    folder = make_seg_dataset(tmp_path / "data", cases=("a_1", "a_2", "b_1", "c_1", "d_1", "e_1"))
    bad = np.zeros((8, 8, 6), np.uint8)
    bad[1:3, 1:3, 1:3] = 5  # a value the registry does not declare
    save(bad, folder / "labelsTr" / "b_1.nii.gz")
    save(np.full((8, 8, 6), 0.5, np.float32), folder / "labelsTr" / "c_1.nii.gz")  # not a label map
    reg = registry_for(tmp_path, Seg=SEG)
    spec = reg.get("Seg")
    assert declared_label_values(spec) == {0, 1}
    checked, table = checked_case_table(read_dataset(spec))
    assert table.case.tolist() == ["a_1", "a_2", "d_1", "e_1"]
    assert [c.case_id for c in checked.cases] == ["a_1", "a_2", "d_1", "e_1"]
    reasons = dict(checked.rejected)
    assert reasons[str(folder / "labelsTr" / "b_1.nii.gz")] == \
        "b_1.nii.gz: label value(s) [5] outside the declared [0, 1]"
    assert "non-integer values [0.5]" in reasons[str(folder / "labelsTr" / "c_1.nii.gz")]

    rejected = tmp_path / "rejected.tsv"
    doc = split_dataset(reg.path, None, "Seg", SplitSettings(folds=0, test_fraction=0.25), split_out=tmp_path / "s.json",
                        rejected_out=rejected)
    assert all_cases(doc) == ["a_1", "a_2", "d_1", "e_1"]
    table = rejected.read_text()
    assert "label value(s) [5] outside" in table and "b_1.nii.gz" in table and "Seg" in table
    # what nnU-Net is given: the split's cases only
    assert [c.case_id for c in restricted_to(read_dataset(spec), all_cases(doc)).cases] == all_cases(doc)


def test_zero_shot_channels_map_this_sets_modalities_onto_the_source_models(tmp_path):
    four = {**GOOD, "modalities": ["T1w", "T1ce_GRE", "T1ce_SE", "FLAIR"]}
    target = {**GOOD, "role": "test", "modalities": ["T1w", "T1ce", "T2w", "FLAIR"], "zero_shot_from": "SRC"}
    reg = load_registry(write_registry(tmp_path / "r.yaml", {
        "SRC": four, "MAPPED": {**target, "zero_shot_channels": ["T1w", "T1ce", "T1ce", "FLAIR"]},
        "UNMAPPED": {**target, "modalities": ["T1ce"]},
        "WRONG": {**target, "zero_shot_channels": ["T1w", "T1ce", "PD", "FLAIR"]}}))
    mapped = reg.get("MAPPED")
    assert mapped.zero_shot_images(["t1", "t1ce", "t2", "flair"]) == ["t1", "t1ce", "t1ce", "flair"]
    assert "models fine-tuned on SRC take 4 channel(s)" in reg.errors["UNMAPPED"]
    assert "datasets.UNMAPPED.zero_shot_from" in reg.errors["UNMAPPED"]
    assert "datasets.WRONG.zero_shot_channels" in reg.errors["WRONG"] and "must list modalities" in reg.errors["WRONG"]
    shipped = load_registry("config/downstream_datasets.yaml")
    assert "BTM" in shipped.datasets and len(shipped.get("BTM").zero_shot_inputs) == shipped.get("BRM").channels


# ------------------------------------------------------------- broken files and changed data


def truncate(path, keep=0.5):
    """Keep the first `keep` of the file's bytes: a half-written download or copy."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_or_corrupt_files_are_rejected_by_the_split_rule(tmp_path):
    from openmind_bench.downstream.splits import SplitSettings, all_cases, split_dataset

    folder = make_seg_dataset(tmp_path / "data", cases=("a_1", "a_2", "b_1", "c_1", "d_1", "e_1", "f_1"))
    truncate(folder / "imagesTr" / "a_2_0001.nii.gz")  # its header still reads: only the data are cut
    label = folder / "labelsTr" / "b_1.nii.gz"
    # float32 and stored, not deflated: nibabel sniffs 1 KiB, and a tiny uint8 label map has fewer
    # bytes (its header would go with half of its deflated stream)
    save(np.asarray(nib.load(str(label)).dataobj).astype(np.float32), label)
    label.write_bytes(gzip.compress(gzip.decompress(label.read_bytes()), compresslevel=0))
    truncate(label, keep=0.6)
    crc = bytearray((folder / "imagesTr" / "d_1_0000.nii.gz").read_bytes())
    crc[-8] ^= 0xFF
    (folder / "imagesTr" / "d_1_0000.nii.gz").write_bytes(bytes(crc))
    for name in ("imagesTr/a_2_0001.nii.gz", "labelsTr/b_1.nii.gz"):
        nib.load(str(folder / name))  # their headers read: what the reader used to stop at
    reg = registry_for(tmp_path, Seg=SEG)

    rejected = tmp_path / "rejected.tsv"
    doc = split_dataset(reg.path, None, "Seg", SplitSettings(folds=0, test_fraction=0.25),
                        split_out=tmp_path / "s.json", rejected_out=rejected)
    assert all_cases(doc) == ["a_1", "c_1", "e_1", "f_1"]
    table = pd.read_csv(rejected, sep="\t", dtype=str).set_index("image")
    assert set(table.dataset) == {"Seg"} and set(table.stage) == {"downstream"}
    reasons = table.reason.to_dict()
    assert reasons[str(folder / "labelsTr" / "a_2.nii.gz")].startswith(
        f"{folder / 'imagesTr' / 'a_2_0001.nii.gz'}: truncated: gzip stream ends after ")
    assert reasons[str(folder / "labelsTr" / "b_1.nii.gz")].startswith(
        f"{folder / 'labelsTr' / 'b_1.nii.gz'}: truncated: gzip stream ends after ")
    assert "d_1_0000.nii.gz: corrupt gzip" in reasons[str(folder / "labelsTr" / "d_1.nii.gz")]
    assert "CRC-32 check failed" in reasons[str(folder / "labelsTr" / "d_1.nii.gz")]
    # downstream-check reads the same way
    data, errors = read_datasets(reg)
    assert errors == {} and len(data["Seg"].rejected) == 3


def test_classification_images_are_checked_too(tmp_path):
    folder = make_cls_dataset(tmp_path / "data")
    truncate(folder / "imagesTr" / "x2_0000.nii.gz", keep=0.9)
    data = read_dataset(registry_for(tmp_path, Cls=CLS).get("Cls"))
    assert [c.case_id for c in data.cases] == ["x1", "y1", "z1"]
    assert "x2_0000.nii.gz: truncated" in dict(data.rejected)["x2"]


def test_data_fingerprint_changes_when_a_file_is_rewritten_and_only_then(tmp_path, repo):
    import os

    from openmind_bench import config as omb_config
    from openmind_bench.downstream.readers import data_fingerprint
    from openmind_bench.downstream.settings import split_data_fingerprint

    folder = make_seg_dataset(tmp_path / "data")
    spec = registry_for(tmp_path, Seg=SEG).get("Seg")
    first = data_fingerprint(spec)
    assert len(first) == 16 and data_fingerprint(spec) == first
    (folder / "notes.txt").write_text("not read by the reader")
    (folder / "imagesTr" / ".DS_Store").write_bytes(b"x")
    assert data_fingerprint(spec) == first
    # what the split rule's param calls, from the workflow config
    config = omb_config.validate({"downstream_registry": str(tmp_path / "registry.yaml"),
                                  "downstream": {"root": str(tmp_path / "data")}}, omb_config.SCHEMA_PATH)
    assert split_data_fingerprint(config, "Seg") == first

    label = folder / "labelsTr" / "b_1.nii.gz"
    stat = label.stat()
    lesion = np.asarray(nib.load(str(label)).dataobj).astype(np.float32)
    save(lesion * 1.5, label)  # a lesion value 1 -> 1.5
    changed = data_fingerprint(spec)
    assert changed != first and data_fingerprint(spec) == changed
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched only
    assert data_fingerprint(spec) not in (first, changed)
    (folder / "imagesTr" / "a_1_0001.nii.gz").unlink()
    assert data_fingerprint(spec) not in (first, changed)


def test_finetuning_refuses_a_case_whose_label_changed_after_the_split(tmp_path, caplog):
    import logging
    from types import SimpleNamespace

    from openmind_bench.downstream.splits import SplitError, SplitSettings, check_case_files, split_dataset, \
        training_cases

    folder = make_seg_dataset(tmp_path / "data", cases=("a_1", "a_2", "b_1", "c_1", "d_1", "e_1"))
    reg = registry_for(tmp_path, Seg=SEG)
    split_path = tmp_path / "s.json"
    doc = split_dataset(reg.path, None, "Seg", SplitSettings(folds=0, test_fraction=0.25), split_out=split_path)
    assert doc["case_files"]["b_1"]["labelsTr/b_1.nii.gz"][0] == (folder / "labelsTr" / "b_1.nii.gz").stat().st_size
    assert sorted(doc["case_files"]["b_1"]) == ["imagesTr/b_1_0000.nii.gz", "imagesTr/b_1_0001.nii.gz",
                                                "labelsTr/b_1.nii.gz"]
    assert list(doc["dataset_files"]) == ["dataset.json"]
    data = read_dataset(reg.get("Seg"), verify_files=False)
    job = SimpleNamespace(split=str(split_path), fold="test")
    train, test = training_cases(job, data, SimpleNamespace(low_data_n=None))  # the files are as recorded
    assert len(train) + len(test) == 6

    label = folder / "labelsTr" / "b_1.nii.gz"
    save(np.asarray(nib.load(str(label)).dataobj).astype(np.float32) * 1.5, label)  # lesion 1 -> 1.5
    with pytest.raises(SplitError, match=rf"{label} changed \(size .*Re-make the split: snakemake re-runs rule "
                                         rf"downstream_split.*delete {split_path}"):
        training_cases(job, data, SimpleNamespace(low_data_n=None))
    check_case_files(doc, split_path, folder, ["a_1"])  # the cases asked for only
    (folder / "imagesTr" / "a_1_0000.nii.gz").unlink()
    with pytest.raises(SplitError, match="a_1_0000.nii.gz is gone"):
        check_case_files(doc, split_path, folder, ["a_1"])
    # an older split without the record: not checked, said in the log
    old = {k: v for k, v in doc.items() if k not in ("case_files", "dataset_files")}
    with caplog.at_level(logging.INFO, logger="openmind_bench.downstream.splits"):
        check_case_files(old, split_path, folder, ["a_1", "b_1"])
    assert "records no file sizes and times" in caplog.text
