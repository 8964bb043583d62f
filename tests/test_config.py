import copy
import re

import pytest
import yaml

from openmind_bench import config as cfg


@pytest.fixture
def schema(repo):
    return repo / "config" / "schema.yaml"


def test_defaults_fill_every_key(schema, repo):
    config = cfg.validate({}, schema)
    assert config["source"]["kind"] == "openneuro"
    assert config["shard_size"] == 200
    assert "T1w" in config["index"]["modalities"]
    assert config["resources"]["fetch"]["mem_mb"] == 2000
    assert "*/func/*" in config["source"]["exclude"]


def test_every_schema_key_has_description_and_default(schema):
    tree = yaml.safe_load(schema.read_text())

    def walk(node, path):
        for name, sub in node.get("properties", {}).items():
            where = f"{path}.{name}".lstrip(".")
            assert "description" in sub, f"{where} has no description"
            # a key its object requires is given wherever the object is (demo.hub.run)
            assert "default" in sub or name in node.get("required", []), f"{where} has no default"
            walk(sub, where)

    walk(tree, "")


@pytest.mark.parametrize(
    "patch, key, value",
    [
        ({"source": {"kind": "ftp"}}, "source.kind", "ftp"),
        ({"shard_size": "big"}, "shard_size", "big"),
        ({"shard_size": 0}, "shard_size", "0"),
        ({"index": {"verify_data": "yes"}}, "index.verify_data", "yes"),
        ({"datasets": ["ds1"]}, "datasets.0", "ds1"),
        ({"demo": {"resolution": 3}}, "demo.resolution", "3"),
    ],
)
def test_errors_name_key_and_value(schema, patch, key, value):
    with pytest.raises(cfg.ConfigError, match=re.escape(f"'{key}'")) as err:
        cfg.validate(copy.deepcopy(patch), schema)
    assert f"'{key}'" in str(err.value)
    assert value in str(err.value)


def test_unknown_key_is_named(schema):
    with pytest.raises(cfg.ConfigError, match="'index.verfy_data'"):
        cfg.validate({"index": {"verfy_data": True}}, schema)


def test_shipped_configs_validate(schema, repo):
    for name in ("config.yaml", "demo.yaml"):
        config = cfg.load(repo / "config" / name, schema)
        table = cfg.read_datasets_table(repo / config["datasets_table"])
        assert cfg.selected_datasets(config, table)


def test_full_table_is_realistic(repo):
    table = cfg.read_datasets_table(repo / "config" / "openneuro_datasets.tsv")
    assert len(table) >= 50
    assert table.dataset_id.is_unique
    assert table.expected_images.min() >= 1


def _table(tmp_path, rows):
    path = tmp_path / "t.tsv"
    path.write_text("dataset_id\tsnapshot\texpected_images\n" + "".join("\t".join(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "rows, message",
    [
        ([("ds12", "1.0.0", "3")], "row 2: dataset_id 'ds12'"),
        ([("ds000001", "1.0.0", "3"), ("ds000002", "", "3")], "row 3: snapshot is empty"),
        ([("ds000001", "1.0.0", "zero")], "expected_images 'zero'"),
        ([("ds000001", "1.0.0", "3"), ("ds000001", "1.0.1", "3")], "duplicated dataset_id"),
    ],
)
def test_table_errors_name_row(tmp_path, rows, message):
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.read_datasets_table(_table(tmp_path, rows))


def test_unknown_selected_dataset(tmp_path):
    table = cfg.read_datasets_table(_table(tmp_path, [("ds000001", "1.0.0", "3")]))
    with pytest.raises(cfg.ConfigError, match="ds000009"):
        cfg.selected_datasets({"datasets": ["ds000009"]}, table)


def test_num_shards():
    assert cfg.num_shards(1, 200) == 1
    assert cfg.num_shards(200, 200) == 1
    assert cfg.num_shards(201, 200) == 2
