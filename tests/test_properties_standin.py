"""Property: the stand-in's /lines query parser answers a query or QueryError 400 for any parameters."""

from hypothesis import given, strategies as st

from dpe_ingest.standin import query
from hypothesis_profiles import counted, json_values

NAMES = st.sampled_from(["size", "page", "after", "qs", "select", "sort", "count", "q", "format",
                         "code_departement_ban_in", "code_departement_ban_eq", "code_departement_ban_nin",
                         "date_reception_dpe_gte", "date_reception_dpe_lt", "date_derniere_modification_dpe_gte",
                         "collapse", "etiquette_dpe_eq", "_c_x_eq", "nope_in"]) | st.text(max_size=8)
QS_TOKENS = st.sampled_from(["(", ")", " AND ", " OR ", "NOT ", "!", "&&", "||", ":", '"', "\\", "[", "]", "{", "}",
                             " TO ", "*", "code_departement_ban", "date_reception_dpe", "_exists_", "69", "2A",
                             "2024-01-01", ">=2023-05-01", "etiquette_dpe", "x"])
QS = st.lists(QS_TOKENS, max_size=25).map("".join) | st.integers(1, 3000).map(
    lambda n: "(" * n + "code_departement_ban:69" + ")" * n)
NUMBERS = (st.integers().map(str) | st.text("0123456789", min_size=15, max_size=5000) | st.floats().map(repr)
           | st.text("0123456789٠١٢３ -+", max_size=6))
VALUES = (QS | NUMBERS | st.text(max_size=20) | json_values(max_leaves=4).map(lambda v: repr(v).replace("'", '"'))
          | st.integers(1, 5000).map(lambda n: "[" * n + "1" + "]" * n) | st.integers(1, 5000).map(lambda n: "[" * n))


@given(st.lists(st.tuples(NAMES, VALUES), max_size=5), st.booleans())
@counted
def test_standin_query_parser_answers_a_query_or_400(params, virtual):
    try:
        q = query.parse(params, virtual=virtual)
    except query.QueryError as exc:
        assert exc.status == 400 and exc.message
        return
    assert 0 <= q.size <= query.MAX_PAGE_SIZE and q.skip + q.size <= query.MAX_PAGE_SIZE
    assert q.after is None or isinstance(q.after, int)
