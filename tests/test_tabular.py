"""Legacy CSV / Parquet files turned into CloudEvents by ingest.tabular."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from ingest.tabular import Mapping, MappingError, iter_tabular, load_mapping, mapping_for
from ingest.validation import EventValidator

ROOT = Path(__file__).resolve().parents[1]

PURCHASE_MAPPING = """\
type = "cdp.purchase"
business_unit = "retail"
source = "retail/legacy-pos"
time = "OrderDate"
[columns]
order_id = "OrderRef"
"customer.source_id" = "CustNo"
"customer.email" = "E-mail"
"customer.address.city" = "Town"
amount = "Total"
[constants]
currency = "EUR"
"""


@pytest.fixture(scope="module")
def validator() -> EventValidator:
    return EventValidator(ROOT / "schemas")


def write(path: Path, text: str, bom: bool = False) -> Path:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def run(path: Path, mapping: Mapping, validator) -> list[tuple[str, dict | str]]:
    return [(origin, item) for origin, item, _ in iter_tabular(path, mapping, validator)]


@pytest.fixture
def purchase_mapping(tmp_path, validator) -> Mapping:
    return load_mapping(write(tmp_path / "legacy.mapping.toml", PURCHASE_MAPPING), validator)


# ------------------------------------------------------------------------------------ mapping files
def test_mapping_for(tmp_path):
    data = write(tmp_path / "legacy.csv", "a\n")
    with pytest.raises(MappingError, match="legacy.mapping.toml"):
        mapping_for(data, None)
    default = write(tmp_path / "legacy.mapping.toml", PURCHASE_MAPPING)
    assert mapping_for(data, None) == default
    other = write(tmp_path / "other.toml", PURCHASE_MAPPING)
    assert mapping_for(data, other) == other
    with pytest.raises(MappingError, match="not found"):
        mapping_for(data, tmp_path / "nope.toml")


def test_load_mapping(purchase_mapping):
    m = purchase_mapping
    assert (m.type, m.business_unit, m.source, m.time, m.id) == (
        "cdp.purchase", "retail", "retail/legacy-pos", "OrderDate", None)
    assert dict(m.columns)["customer.address.city"] == "Town"
    assert dict(m.constants) == {"currency": "EUR"}
    assert dict(m.field_types)["amount"] == "number"


@pytest.mark.parametrize("text, fragment", [
    (PURCHASE_MAPPING.replace("cdp.purchase", "cdp.foo"), "unknown event type 'cdp.foo'"),
    (PURCHASE_MAPPING.replace('business_unit = "retail"\n', ""), "required key 'business_unit' is missing"),
    (PURCHASE_MAPPING.replace('source = "retail/legacy-pos"\n', ""), "required key 'source' is missing"),
    (PURCHASE_MAPPING.replace('time = "OrderDate"\n', ""), "required key 'time' is missing"),
    (PURCHASE_MAPPING.replace('"customer.email"', '"customer.mail"'), "unknown field path 'customer.mail'"),
    (PURCHASE_MAPPING.replace('amount = "Total"', 'items = "Items"'), "unknown field path 'items'"),
    (PURCHASE_MAPPING.replace('amount = "Total"\n', ""), "required field(s) of cdp.purchase not mapped: amount"),
    (PURCHASE_MAPPING.replace('"customer.source_id" = "CustNo"\n', ""), "not mapped: customer.source_id"),
    (PURCHASE_MAPPING + 'amount = 3.0\n', "in both [columns] and [constants]"),
    (PURCHASE_MAPPING.replace('currency = "EUR"', "currency = 978"), "[constants] 'currency': 978 is not a string"),
    (PURCHASE_MAPPING.replace('business_unit = "retail"', 'business_unit = "Retail Bank"'), "business_unit"),
    (PURCHASE_MAPPING.replace("[columns]", "[colums]"), "unknown key(s) 'colums'"),
    (PURCHASE_MAPPING.replace('amount = "Total"', "amount = 5"), "column name must be a non-empty string"),
    (PURCHASE_MAPPING + "business_unit = 'x'\n", "set it with the top-level key"),
    ("type = [", "invalid TOML"),
])
def test_mapping_errors(tmp_path, validator, text, fragment):
    path = write(tmp_path / "m.toml", text)
    with pytest.raises(MappingError) as info:
        load_mapping(path, validator)
    message = str(info.value)
    assert fragment in message and str(path) in message and "\n" not in message, message


def test_missing_mapping_file(tmp_path, validator):
    with pytest.raises(MappingError, match="not found"):
        load_mapping(tmp_path / "absent.toml", validator)


# ------------------------------------------------------------------------------------ CSV
def test_csv_semicolon_bom_and_conversion(tmp_path, purchase_mapping, validator):
    csv_path = write(tmp_path / "legacy.csv",
                     "OrderRef;CustNo;E-mail;Town;Total;OrderDate;Unmapped\n"
                     "A1;C1;a@x.com;Paris;1234,50;2024-03-01;zzz\n"
                     "A2;C2;;  Lyon ;12.5;2024-03-02 10:15;\n",
                     bom=True)
    rows = run(csv_path, purchase_mapping, validator)
    assert [o for o, _ in rows] == ["legacy.csv:row 1", "legacy.csv:row 2"]
    first, second = rows[0][1], rows[1][1]
    assert first["data"] == {"business_unit": "retail", "currency": "EUR", "order_id": "A1", "amount": 1234.5,
                             "customer": {"source_id": "C1", "email": "a@x.com", "address": {"city": "Paris"}}}
    assert {k: first[k] for k in ("specversion", "source", "type", "time", "datacontenttype")} == {
        "specversion": "1.0", "source": "retail/legacy-pos", "type": "cdp.purchase",
        "time": "2024-03-01T00:00:00Z", "datacontenttype": "application/json"}
    assert second["time"] == "2024-03-02T10:15:00Z"
    assert "email" not in second["data"]["customer"]  # empty cell omitted, not ""
    assert second["data"]["customer"]["address"]["city"] == "Lyon"
    assert first["id"] != second["id"]
    for _, event in rows:
        assert validator.check(event) is None


@pytest.mark.parametrize("delimiter", [",", ";", "\t"])
def test_delimiter_detection(tmp_path, purchase_mapping, validator, delimiter):
    lines = [["OrderRef", "CustNo", "E-mail", "Town", "Total", "OrderDate"],
             ["A1", "C1", "a@x.com", "Paris", "10", "2024-03-01T10:00:00+01:00"]]
    csv_path = write(tmp_path / "legacy.csv", "\n".join(delimiter.join(r) for r in lines) + "\n")
    [(origin, event)] = run(csv_path, purchase_mapping, validator)
    assert isinstance(event, dict), event
    assert event["time"] == "2024-03-01T10:00:00+01:00" and event["data"]["amount"] == 10.0


def test_short_row_is_rejected_and_neighbours_still_come(tmp_path, purchase_mapping, validator):
    csv_path = write(tmp_path / "legacy.csv",
                     "OrderRef,CustNo,E-mail,Town,Total,OrderDate\n"
                     "A1,C1,,Paris,1,2024-03-01\n"
                     "A2,C2\n"
                     "\n"
                     "A3,C3,,Nice,3,2024-03-03\n"
                     "A4,C4,,Nice,4,2024-03-04,,\n")  # trailing empty cells are tolerated
    rows = run(csv_path, purchase_mapping, validator)
    assert [o for o, _ in rows] == [f"legacy.csv:row {i}" for i in (1, 2, 3, 4)]
    assert isinstance(rows[0][1], dict) and isinstance(rows[2][1], dict) and isinstance(rows[3][1], dict)
    assert rows[1][1] == "expected 6 cells like the header, found 2 (line 3)"


@pytest.mark.parametrize("cell, reason", [
    ("abc", "column 'Total' (amount): 'abc' is not a number"),
    ("1,234.50", "column 'Total' (amount): '1,234.50' is not a number"),
])
def test_uncoercible_value(tmp_path, purchase_mapping, validator, cell, reason):
    csv_path = write(tmp_path / "legacy.csv",
                     f'OrderRef;CustNo;E-mail;Town;Total;OrderDate\nA1;C1;;;{cell};2024-03-01\n')
    assert run(csv_path, purchase_mapping, validator) == [("legacy.csv:row 1", reason)]


@pytest.mark.parametrize("cell, expected", [
    ("2024-03-01", "2024-03-01T00:00:00Z"),
    ("2024-03-01 10:15", "2024-03-01T10:15:00Z"),
    ("2024-03-01 10:15:07", "2024-03-01T10:15:07Z"),
    ("2024-03-01T10:15:07", "2024-03-01T10:15:07Z"),
    ("2024-03-01T10:15:07.5Z", "2024-03-01T10:15:07.5Z"),
    ("2024-03-01T10:15:07-05:00", "2024-03-01T10:15:07-05:00"),
    ("2024-02-30", None), ("01/03/2024", None), ("2024-03-01T25:00:00Z", None), ("", None),
])
def test_time_column(tmp_path, purchase_mapping, validator, cell, expected):
    csv_path = write(tmp_path / "legacy.csv", f"OrderRef;CustNo;E-mail;Town;Total;OrderDate\nA1;C1;;;1;{cell}\n")
    [(_, result)] = run(csv_path, purchase_mapping, validator)
    if expected is None:
        assert isinstance(result, str) and "'OrderDate' (time)" in result, result
    else:
        assert result["time"] == expected and validator.check(result) is None


def test_coercion_of_each_type(tmp_path, validator):
    write(tmp_path / "c.mapping.toml", """
type = "cdp.consent"
business_unit = "telecom"
source = "telecom/legacy"
time = "When"
[columns]
"customer.source_id" = "Id"
purpose = "Purpose"
granted = "OK"
""")
    rows = ["Id,Purpose,OK,When"] + [f"T{i},email,{v},2024-01-01" for i, v in
                                     enumerate(["yes", "No", "TRUE", "false", "1", "0", "y", "N", "maybe"])]
    csv_path = write(tmp_path / "c.csv", "\n".join(rows) + "\n")
    mapping = load_mapping(mapping_for(csv_path, None), validator)
    results = [r for _, r in run(csv_path, mapping, validator)]
    assert [r["data"]["granted"] for r in results[:-1]] == [True, False, True, False, True, False, True, False]
    assert results[-1] == "column 'OK' (granted): 'maybe' is not a boolean"

    from ingest.tabular import _coerce
    assert _coerce("1234,50", "number") == (True, 1234.5)
    assert _coerce("-0.5", "number") == (True, -0.5)
    assert _coerce("nan", "number")[0] is False and _coerce("inf", "number")[0] is False
    assert _coerce("12", "integer") == (True, 12) and _coerce("12.0", "integer") == (True, 12)
    assert _coerce("12.5", "integer")[0] is False
    assert _coerce(7, "string") == (True, "7") and _coerce(7.0, "string") == (True, "7")
    assert _coerce(3, "number") == (True, 3.0) and _coerce(True, "number")[0] is False


def test_invalid_utf8_row_is_rejected_not_fatal(tmp_path, purchase_mapping, validator):
    csv_path = tmp_path / "legacy.csv"
    csv_path.write_bytes(b"OrderRef;CustNo;E-mail;Town;Total;OrderDate\n"
                         b"A1;C1;;Paris;1;2024-03-01\n"
                         b"A2;C2;;Z\xfcrich;2;2024-03-02\n"  # a latin-1 byte
                         + "A3;C3;;Zürich;3;2024-03-03\n".encode())
    rows = run(csv_path, purchase_mapping, validator)
    assert rows[1] == ("legacy.csv:row 2", "row is not valid UTF-8")
    assert rows[2][1]["data"]["customer"]["address"]["city"] == "Zürich"
    assert isinstance(rows[0][1], dict)


def test_mapped_column_missing_from_header(tmp_path, purchase_mapping, validator):
    csv_path = write(tmp_path / "legacy.csv", "OrderRef;CustNo;Town;Total;OrderDate\nA1;C1;P;1;2024-03-01\n")
    [(origin, reason)] = run(csv_path, purchase_mapping, validator)
    assert origin == "legacy.csv:header" and "'E-mail'" in reason


def test_id_column_and_idempotent_hash_ids(tmp_path, purchase_mapping, validator):
    text = "OrderRef;CustNo;E-mail;Town;Total;OrderDate\nA1;C1;;;1;2024-03-01\nA2;C1;;;1;2024-03-01\n"
    (tmp_path / "a").mkdir()
    first = write(tmp_path / "a" / "legacy.csv", text)
    second = write(tmp_path / "legacy.csv", text.replace(";1;", ";1,0;"))  # same values, other spelling
    ids1 = [e["id"] for _, e in run(first, purchase_mapping, validator)]
    ids1_again = [e["id"] for _, e in run(first, purchase_mapping, validator)]
    ids2 = [e["id"] for _, e in run(second, purchase_mapping, validator)]
    assert ids1 == ids1_again == ids2 and len(set(ids1)) == 2

    with_id = write(tmp_path / "m.toml", PURCHASE_MAPPING.replace('time = "OrderDate"', 'time = "OrderDate"\nid = "OrderRef"'))
    mapping = load_mapping(with_id, validator)
    assert [e["id"] for _, e in run(first, mapping, validator)] == ["A1", "A2"]
    blank = write(tmp_path / "blank.csv", "OrderRef;CustNo;E-mail;Town;Total;OrderDate\n;C1;;;1;2024-03-01\n")
    assert run(blank, mapping, validator) == [("blank.csv:row 1", "column 'OrderRef' (id) is empty")]


# ------------------------------------------------------------------------------------ Parquet
def test_parquet_round_trip(tmp_path, purchase_mapping, validator):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({
        "OrderRef": ["A1", "A2", "A3"],
        "CustNo": [101, 102, 103],                       # ints feed a string field
        "E-mail": ["a@x.com", None, ""],
        "Town": ["Paris", "Lyon", None],
        "Total": [10.5, None, 3.0],
        "OrderDate": [dt.datetime(2024, 3, 1, 10, 0), dt.datetime(2024, 3, 2, tzinfo=dt.timezone.utc), None],
        "Ignored": [1, 2, 3],
    })
    path = tmp_path / "legacy.parquet"
    pq.write_table(table, path, row_group_size=2)
    rows = run(path, purchase_mapping, validator)
    assert [o for o, _ in rows] == ["legacy.parquet:row 1", "legacy.parquet:row 2", "legacy.parquet:row 3"]
    first, second, third = (r for _, r in rows)
    assert first["time"] == "2024-03-01T10:00:00Z"
    assert first["data"] == {"business_unit": "retail", "currency": "EUR", "order_id": "A1", "amount": 10.5,
                             "customer": {"source_id": "101", "email": "a@x.com", "address": {"city": "Paris"}}}
    assert validator.check(first) is None
    assert second["time"] == "2024-03-02T00:00:00Z" and "amount" not in second["data"]
    assert validator.check(second).endswith("'amount' is a required property (rule: required)")
    assert third == "column 'OrderDate' (time) is empty"

    # the same rows as CSV give the same events and ids
    csv_path = write(tmp_path / "legacy.csv", "OrderRef,CustNo,E-mail,Town,Total,OrderDate\n"
                                              "A1,101,a@x.com,Paris,\"10,5\",2024-03-01 10:00\n")
    [(_, from_csv)] = run(csv_path, purchase_mapping, validator)
    assert from_csv == first


def test_parquet_missing_column_and_corrupt_file(tmp_path, purchase_mapping, validator):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"OrderRef": ["A1"]}), path)
    [(origin, reason)] = run(path, purchase_mapping, validator)
    assert origin == "x.parquet:header" and "not in the file's columns" in reason
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    [(origin, reason)] = run(bad, purchase_mapping, validator)
    assert origin == "bad.parquet:header" and "not a readable Parquet file" in reason


def test_unsupported_suffix(tmp_path, purchase_mapping, validator):
    with pytest.raises(ValueError, match="not a CSV or Parquet"):
        run(write(tmp_path / "x.xlsx", ""), purchase_mapping, validator)


def test_csv_streams_large_file(tmp_path, purchase_mapping, validator):
    path = tmp_path / "big.csv"
    with path.open("w") as f:
        f.write("OrderRef,CustNo,E-mail,Town,Total,OrderDate\n")
        for i in range(20000):
            f.write(f"A{i},C{i % 97},,Town{i % 7},{i}.5,2024-03-01\n")
    it = iter_tabular(path, purchase_mapping, validator)
    origin, event, _ = next(it)  # lazy: first row available without reading the rest
    assert origin == "big.csv:row 1" and event["data"]["order_id"] == "A0"
    assert sum(1 for _ in it) == 19999
