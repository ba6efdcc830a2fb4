"""Property: every value is a department code or InvalidDepartment, and a code normalises to itself."""

from hypothesis import given, strategies as st

from dpe_ingest import departments
from hypothesis_profiles import counted, json_values

CODES = st.sampled_from(departments.ALL_CODES)
RAW = (CODES | CODES.map(str.lower) | CODES.map(lambda c: f" {c} ")
       | st.integers() | st.integers(min_value=10**4290, max_value=10**4400) | st.floats() | st.text(max_size=8)
       | st.text(alphabet="0123456789٠١٢٣٤٥٦٧٨٩２AaBbNnOoEe ", max_size=6) | json_values(max_leaves=3))


@given(RAW)
@counted
def test_department_codes(raw):
    try:
        code = departments.normalize(raw)
    except departments.InvalidDepartment as exc:
        assert "valid forms are" in str(exc)
        return
    assert code in departments.ALL_CODES
    assert departments.normalize(code) == code
    if isinstance(raw, str):
        assert raw.strip().upper().lstrip("0") in (code.upper().lstrip("0"), "")
