"""Bad values fail at helm template/install with a message naming the value and what is accepted."""

from __future__ import annotations

import pytest

VALID_FORMS = "01..19, 2A, 2B, 21..95, 971..978, 988, none"


@pytest.mark.parametrize(
    "how, value, shown",
    [
        ("set", "{69,99}", '"99"'),
        ("set", "{20}", '"20"'),
        ("set", "{979}", '"979"'),
        ("set", "{99}", '"99"'),
        ("set", "{6a}", '"6a"'),
        ("set", "{nothing}", '"nothing"'),
        ("set", "{0}", '"0"'),
        ("set", "{2C}", '"2C"'),
        ("set", "{abc}", '"abc"'),
        ("set_string", "abc", '"abc"'),
        ("set_string", r"69\,100", '"100"'),
        ("set", "{6.5}", '"6.5"'),
    ],
)
def test_bad_department_code(render, how, value, shown):
    kw = {"sets" if how == "set" else "set_strings": {"departments": value}}
    err = render.template_error(**kw)
    assert f"invalid department code {shown}" in err, err
    assert VALID_FORMS in err, err


@pytest.mark.parametrize("how, value", [("set", "{}"), ("set_string", ""), ("set", "null")])
def test_empty_departments(render, how, value):
    kw = {"sets" if how == "set" else "set_strings": {"departments": value}}
    err = render.template_error(**kw)
    assert "departments is empty" in err, err
    assert VALID_FORMS in err


def test_empty_list_from_values_file(render, tmp_path):
    f = tmp_path / "v.yaml"
    f.write_text("departments: []\n")
    err = render.template_error(values_files=[f])
    assert "departments is empty" in err and VALID_FORMS in err


def test_department_of_wrong_type(render, tmp_path):
    f = tmp_path / "v.yaml"
    f.write_text("departments: [{code: 69}]\n")
    err = render.template_error(values_files=[f])
    # caught by values.schema.json before the templates
    assert "/departments/0" in err, err


@pytest.mark.parametrize(
    "sets, path, detail",
    [
        ({"consumer.batchSize": "0"}, "/consumer/batchSize", "minimum: got 0, want 1"),
        ({"producer.image.repository": ""}, "/producer/image/repository", "minLength: got 0, want 1"),
        ({"consumer.image.repository": ""}, "/consumer/image/repository", "minLength: got 0, want 1"),
        ({"ademe.pageSize": "20000"}, "/ademe/pageSize", "maximum: got 20,000, want 10,000"),
        ({"kafka.topicPartitions": "0"}, "/kafka/topicPartitions", "minimum: got 0, want 1"),
        ({"log.format": "xml"}, "/log/format", "one of 'logfmt', 'json'"),
        ({"consumer.table": "1bad"}, "/consumer/table", "1bad"),
        ({"kafka.clusterId": "short"}, "/kafka/clusterId", "short"),
        ({"producer.unknownKey": "1"}, "/producer", "unknownKey"),
        ({"department": "69"}, "", "additional properties 'department' not allowed"),  # typo of departments
    ],
)
def test_schema_rejections(render, sets, path, detail):
    err = render.template_error(sets=sets)
    assert "values don't meet the specifications of the schema" in err, err
    assert f"at '{path}'" in err, err
    assert detail in err, err


def test_external_switches_need_their_settings(render):
    err = render.template_error(sets={"kafka.enabled": "false"})
    assert "externalKafka.bootstrapServers" in err
    err = render.template_error(sets={"kafka.enabled": "false", "externalKafka.bootstrapServers": "nohostport"})
    assert "/externalKafka/bootstrapServers" in err
    err = render.template_error(sets={"postgresql.enabled": "false"})
    assert "externalPostgresql.url" in err
    err = render.template_error(sets={"postgresql.enabled": "false", "externalPostgresql.url": "mysql://x"})
    assert "/externalPostgresql/url" in err


def test_bad_rerun(render):
    err = render.template_error(sets={"producer.rerun.99": "1"})
    assert 'invalid department code "99"' in err
    err = render.template_error(set_strings={"producer.rerun.69": "soon"})
    assert "/producer/rerun/69" in err or "producer.rerun.69" in err
